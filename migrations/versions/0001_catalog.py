"""Catalog schema, the trigger-fed classification queue, and the model registry.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = """
CREATE TABLE categories (
    id        serial PRIMARY KEY,
    name      text NOT NULL UNIQUE,
    parent_id integer REFERENCES categories (id)
);

CREATE TABLE training_runs (
    id              serial PRIMARY KEY,
    status          text NOT NULL DEFAULT 'running',
    params          jsonb NOT NULL DEFAULT '{}',
    n_rows          integer,
    metrics         jsonb NOT NULL DEFAULT '{}',
    report_dir      text,
    label_watermark timestamptz,
    error           text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

CREATE TABLE model_versions (
    id              serial PRIMARY KEY,
    version         text NOT NULL UNIQUE,
    status          text NOT NULL
                    CHECK (status IN ('candidate', 'champion', 'retired', 'rejected')),
    artifact        bytea NOT NULL,
    sha256          text NOT NULL,
    labels          jsonb NOT NULL,
    encoders        jsonb NOT NULL,
    metrics         jsonb NOT NULL DEFAULT '{}',
    threshold       double precision NOT NULL,
    training_run_id integer REFERENCES training_runs (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    promoted_at     timestamptz
);
-- At most one champion, enforced by the database rather than by care.
CREATE UNIQUE INDEX model_versions_one_champion ON model_versions (status)
    WHERE status = 'champion';

CREATE TABLE products (
    id               bigserial PRIMARY KEY,
    sku              text NOT NULL UNIQUE,
    name             text NOT NULL,
    description      text NOT NULL DEFAULT '',
    image_uri        text,
    label_id         integer REFERENCES categories (id),
    label_source     text,
    labeled_at       timestamptz,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'classified', 'needs_review', 'failed')),
    predicted_id     integer REFERENCES categories (id),
    confidence       double precision,
    model_version_id integer REFERENCES model_versions (id),
    classified_at    timestamptz,
    error            text,
    content_hash     text NOT NULL GENERATED ALWAYS AS (
        md5(name || chr(31) || coalesce(description, '') || chr(31) || coalesce(image_uri, ''))
    ) STORED,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX products_status ON products (status);
CREATE INDEX products_labeled ON products (labeled_at) WHERE label_id IS NOT NULL;
CREATE INDEX products_model_version ON products (model_version_id);

CREATE TABLE predictions (
    id               bigserial PRIMARY KEY,
    product_id       bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    model_version_id integer NOT NULL REFERENCES model_versions (id),
    content_hash     text NOT NULL,
    predicted_id     integer REFERENCES categories (id),
    confidence       double precision,
    top_k            jsonb NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- A repeated job (at-least-once delivery) writes nothing new.
    UNIQUE (product_id, model_version_id, content_hash)
);

CREATE TABLE embeddings (
    product_id   bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    encoder      text NOT NULL,
    content_hash text NOT NULL,
    dim          integer NOT NULL,
    vector       bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (product_id, encoder, content_hash)
);

CREATE TABLE backfill_runs (
    id              serial PRIMARY KEY,
    selector        jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'running',
    total           integer NOT NULL DEFAULT 0,
    enqueued        integer NOT NULL DEFAULT 0,
    last_product_id bigint NOT NULL DEFAULT 0,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

CREATE TABLE classification_queue (
    id          bigserial PRIMARY KEY,
    product_id  bigint NOT NULL UNIQUE REFERENCES products (id) ON DELETE CASCADE,
    reason      text NOT NULL,
    backfill_id integer REFERENCES backfill_runs (id) ON DELETE SET NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    not_before  timestamptz NOT NULL DEFAULT now(),
    attempts    integer NOT NULL DEFAULT 0,
    claimed_at  timestamptz,
    last_error  text
);
CREATE INDEX classification_queue_ready ON classification_queue (not_before, id);
"""

# The event path starts here, inside the writer's own transaction: whoever
# inserts (an ETL job, psql, the importer), the work is recorded, and a
# rollback leaves nothing behind.
TRIGGERS = """
-- Row level, BEFORE: a new or changed product is pending again, and label
-- changes are timestamped so scheduled retraining can count them.
CREATE FUNCTION shelver_products_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.status := 'pending';
        IF NEW.label_id IS NOT NULL THEN
            NEW.labeled_at := now();
        END IF;
    ELSE
        IF (NEW.name, NEW.description, NEW.image_uri)
           IS DISTINCT FROM (OLD.name, OLD.description, OLD.image_uri) THEN
            NEW.status := 'pending';
            NEW.error := NULL;
        END IF;
        IF (NEW.label_id, NEW.label_source) IS DISTINCT FROM (OLD.label_id, OLD.label_source) THEN
            NEW.labeled_at := now();
        END IF;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER products_before_write
    BEFORE INSERT OR UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION shelver_products_before_write();

-- Statement level, with transition tables: a 100k-row INSERT ... SELECT
-- enqueues with one INSERT and sends one NOTIFY, not 100k of each.
CREATE FUNCTION shelver_enqueue_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO classification_queue (product_id, reason)
    SELECT id, 'insert' FROM inserted_rows
    ON CONFLICT (product_id) DO NOTHING;
    IF FOUND THEN
        -- The payload is empty on purpose: PostgreSQL folds identical
        -- notifications of one transaction into one, and the dispatcher
        -- only needs a wake-up, the rows are in the table.
        PERFORM pg_notify('shelver_queue', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER products_enqueue_insert
    AFTER INSERT ON products
    REFERENCING NEW TABLE AS inserted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION shelver_enqueue_inserted();

-- Only a change of what the model sees (name, description, image_uri, all
-- folded into content_hash) queues the product again; label-only or
-- result-only updates do not. A row already queued, even one a worker has
-- claimed, is made ready again: the claimed work is for old content, and the
-- worker will not delete a queue row whose product changed under it.
CREATE FUNCTION shelver_enqueue_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO classification_queue (product_id, reason)
    SELECT n.id, 'update'
    FROM updated_new n JOIN updated_old o ON o.id = n.id
    WHERE n.content_hash <> o.content_hash
    ON CONFLICT (product_id) DO UPDATE
        SET reason = 'update', claimed_at = NULL, not_before = now(),
            attempts = 0, last_error = NULL, backfill_id = NULL;
    IF FOUND THEN
        PERFORM pg_notify('shelver_queue', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER products_enqueue_update
    AFTER UPDATE ON products
    REFERENCING OLD TABLE AS updated_old NEW TABLE AS updated_new
    FOR EACH STATEMENT EXECUTE FUNCTION shelver_enqueue_updated();
"""


def upgrade() -> None:
    op.execute(TABLES)
    op.execute(TRIGGERS)


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE IF EXISTS classification_queue, backfill_runs, embeddings, predictions,
            products, model_versions, training_runs, categories CASCADE;
        DROP FUNCTION IF EXISTS shelver_products_before_write, shelver_enqueue_inserted,
            shelver_enqueue_updated;
        """
    )
