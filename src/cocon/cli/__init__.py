"""The `cocon` command line: a thin client of the API (`cocon.api.client.Client`). See docs/cli.md."""
