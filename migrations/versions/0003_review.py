"""People in the loop: users and their sessions, who labeled what, import batches, audits.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = """
CREATE TABLE users (
    id            serial PRIMARY KEY,
    name          text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.@-]{1,64}$'),
    role          text NOT NULL CHECK (role IN ('reviewer', 'admin')),
    -- argon2id, in its own self-describing format (parameters and salt included).
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Server-side sessions: signing out or expiry ends a session for real, which a
-- signed cookie alone cannot do. The cookie carries a random token; only its
-- hash is stored, so a copy of this table does not let anyone sign in.
CREATE TABLE web_sessions (
    token_sha256 text PRIMARY KEY,
    user_id      integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);

-- Failed sign-ins, counted per name and per client address to rate-limit
-- guessing. Kept in the database so every `shelver serve` process agrees.
CREATE TABLE login_failures (
    id        bigserial PRIMARY KEY,
    name      text NOT NULL,
    client    text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_name ON login_failures (name, failed_at);
CREATE INDEX login_failures_client ON login_failures (client, failed_at);

-- One run of `shelver import`: what the review queue filters on.
CREATE TABLE import_batches (
    id         serial PRIMARY KEY,
    source     text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE products
    ADD COLUMN labeled_by      integer REFERENCES users (id),
    ADD COLUMN import_batch_id integer REFERENCES import_batches (id);

-- The review page reads the least confident waiting products, optionally of
-- one predicted category or one import batch; each of these partial indexes
-- returns a page of them without sorting the whole queue.
CREATE INDEX products_review_queue ON products (confidence NULLS FIRST, id)
    WHERE status = 'needs_review';
CREATE INDEX products_review_by_category ON products (predicted_id, confidence NULLS FIRST, id)
    WHERE status = 'needs_review';
CREATE INDEX products_review_by_batch ON products (import_batch_id, confidence NULLS FIRST, id)
    WHERE status = 'needs_review';

-- A person's verdict on one automatic decision. `correct` is what live
-- precision is estimated from; one verdict per product and model, since the
-- audit judges the model's decision, not the product.
CREATE TABLE audits (
    id               bigserial PRIMARY KEY,
    product_id       bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    model_version_id integer NOT NULL REFERENCES model_versions (id),
    predicted_id     integer NOT NULL REFERENCES categories (id),
    confidence       double precision NOT NULL,
    verdict_id       integer NOT NULL REFERENCES categories (id),
    correct          boolean NOT NULL GENERATED ALWAYS AS (verdict_id = predicted_id) STORED,
    audited_by       integer NOT NULL REFERENCES users (id),
    audited_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (product_id, model_version_id)
);
CREATE INDEX audits_model ON audits (model_version_id, predicted_id);
"""

# The audit sample is drawn, not stored: every automatic decision gets a fixed
# pseudo-random number from its product and model, and it is in the sample when
# that number is below SHELVER_AUDIT_RATE. Nothing on the worker's write path
# changes, the draw is uniform and independent of whether the model was right
# (so audited precision is unbiased), and raising the rate keeps every product
# already in the sample.
AUDIT_DRAW = """
CREATE FUNCTION shelver_audit_draw(product_id bigint, model_version_id integer)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ('x' || lpad(left(md5(product_id::text || ':' || model_version_id::text), 12), 16, '0'))
           ::bit(64)::bigint / 281474976710656.0
$$;

-- Auto-accepted products (classified by the model, no label) in draw order,
-- so the audit page reads the sample straight from the index.
CREATE INDEX products_audit_draw ON products (shelver_audit_draw(id, model_version_id))
    WHERE status = 'classified' AND label_id IS NULL AND model_version_id IS NOT NULL;
"""


def upgrade() -> None:
    op.execute(TABLES)
    op.execute(AUDIT_DRAW)


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX IF EXISTS products_audit_draw, products_review_queue,
            products_review_by_category, products_review_by_batch;
        DROP FUNCTION IF EXISTS shelver_audit_draw;
        DROP TABLE IF EXISTS audits, login_failures, web_sessions CASCADE;
        ALTER TABLE products DROP COLUMN IF EXISTS labeled_by,
            DROP COLUMN IF EXISTS import_batch_id;
        DROP TABLE IF EXISTS import_batches, users CASCADE;
        """
    )
