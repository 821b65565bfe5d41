-- The platform's tables, for the columns the gateway reads, with the platform's indexes
-- (DESIGN.md §7): systems by primary key, organizations by the unique partial indexes on
-- logto_id among the live ones.
CREATE TABLE distributors (
    id          text PRIMARY KEY,
    logto_id    text,
    name        text NOT NULL,
    custom_data jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);
CREATE UNIQUE INDEX distributors_logto_id_live ON distributors (logto_id) WHERE deleted_at IS NULL;

CREATE TABLE resellers (LIKE distributors INCLUDING DEFAULTS, PRIMARY KEY (id));
CREATE UNIQUE INDEX resellers_logto_id_live ON resellers (logto_id) WHERE deleted_at IS NULL;

CREATE TABLE customers (LIKE distributors INCLUDING DEFAULTS, PRIMARY KEY (id));
CREATE UNIQUE INDEX customers_logto_id_live ON customers (logto_id) WHERE deleted_at IS NULL;

CREATE TABLE systems (
    id                   text PRIMARY KEY,
    name                 text NOT NULL,
    organization_id      text NOT NULL,
    system_key           text,
    registered_at        timestamptz,
    deleted_at           timestamptz,
    suspended_at         timestamptz,
    system_secret_public text,
    system_secret_sha256 text,
    created_at           timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX systems_system_key ON systems (system_key) WHERE system_key IS NOT NULL;
CREATE INDEX systems_organization_id ON systems (organization_id);
