"""The merchandisers' web application: review queue, audits, dashboard and registry (`shelver serve`)."""
