-- Cache keys match case-insensitively in ASCII letters (lower() of a "C" column changes
-- only those), as GitHub's cache service matches them.
CREATE INDEX cache_entries_by_folded_key
    ON cache_entries (repository, scope, version, lower(key));
