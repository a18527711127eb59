-- The metadata schema, column for column the embedded SQLite store's.
-- Every TEXT column compares bytewise (COLLATE "C"), as SQLite's BINARY collation does,
-- so listings page and sort the same on both stores whatever the cluster's locale.
CREATE TABLE repos (
    id   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE
);
CREATE TABLE blobs (
    digest      TEXT COLLATE "C" PRIMARY KEY,
    size        BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    accessed_at BIGINT NOT NULL
);
CREATE TABLE repo_blobs (
    repo_id BIGINT NOT NULL,
    digest  TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (repo_id, digest)
);
CREATE TABLE manifests (
    repo_id       BIGINT NOT NULL,
    digest        TEXT COLLATE "C" NOT NULL,
    media_type    TEXT COLLATE "C" NOT NULL,
    artifact_type TEXT COLLATE "C",
    subject       TEXT COLLATE "C",
    annotations   TEXT COLLATE "C" NOT NULL,
    content       BYTEA NOT NULL,
    created_at    BIGINT NOT NULL,
    accessed_at   BIGINT NOT NULL,
    cache         TEXT COLLATE "C",
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX manifests_by_subject ON manifests (repo_id, subject) WHERE subject IS NOT NULL;
CREATE TABLE manifest_refs (
    repo_id         BIGINT NOT NULL,
    manifest_digest TEXT COLLATE "C" NOT NULL,
    child_digest    TEXT COLLATE "C" NOT NULL,
    kind            TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (repo_id, manifest_digest, child_digest, kind)
);
CREATE INDEX manifest_refs_by_child ON manifest_refs (child_digest);

CREATE TABLE tags (
    repo_id     BIGINT NOT NULL,
    name        TEXT COLLATE "C" NOT NULL,
    digest      TEXT COLLATE "C" NOT NULL,
    updated_at  BIGINT NOT NULL,
    accessed_at BIGINT NOT NULL,
    PRIMARY KEY (repo_id, name)
);
CREATE TABLE uploads (
    id         TEXT COLLATE "C" PRIMARY KEY,
    repo_id    BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX repo_blobs_by_digest ON repo_blobs (digest);
CREATE INDEX tags_by_digest ON tags (repo_id, digest);
CREATE TABLE sessions (
    id         TEXT COLLATE "C" PRIMARY KEY,
    name       TEXT COLLATE "C",
    repos      TEXT COLLATE "C" NOT NULL,
    started_at BIGINT NOT NULL,
    ended_at   BIGINT NOT NULL,
    report     TEXT COLLATE "C" NOT NULL
);
CREATE INDEX sessions_by_end ON sessions (ended_at);
CREATE TABLE cache_entries (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    repository  TEXT COLLATE "C" NOT NULL,
    scope       TEXT COLLATE "C" NOT NULL,
    key         TEXT COLLATE "C" NOT NULL,
    version     TEXT COLLATE "C" NOT NULL,
    size        BIGINT,
    created_ms  BIGINT NOT NULL,
    accessed_at BIGINT NOT NULL,
    UNIQUE (repository, scope, version, key)
);
CREATE TABLE cache_parts (
    entry_id BIGINT NOT NULL,
    start    BIGINT NOT NULL,
    digest   TEXT COLLATE "C" NOT NULL,
    len      BIGINT NOT NULL,
    PRIMARY KEY (entry_id, start)
);
CREATE INDEX cache_parts_by_digest ON cache_parts (digest);
CREATE TABLE cache_blocks (
    entry_id BIGINT NOT NULL,
    block    TEXT COLLATE "C" NOT NULL,
    digest   TEXT COLLATE "C" NOT NULL,
    len      BIGINT NOT NULL,
    PRIMARY KEY (entry_id, block)
);
CREATE INDEX cache_blocks_by_digest ON cache_blocks (digest);
CREATE TABLE released_blobs (
    digest      TEXT COLLATE "C" PRIMARY KEY,
    released_at BIGINT NOT NULL
);
