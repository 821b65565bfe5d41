"""Tools behind the CLI, never used while serving: demo backups for `make run`, `seed` for
load tests, `set-secret` to give a file-directory system appliance credentials.

It may import `gateway.config`, `gateway.identity`, `gateway.directory` and
`storage_backends`.
"""
