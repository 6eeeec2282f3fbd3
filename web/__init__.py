"""The merchandisers' web application (`shelver serve`): review, audit, dashboard, registry."""
