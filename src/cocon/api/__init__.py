"""The API: a client interface (`client.Client`) and, until the node daemon exists, an in-process
implementation (`local.LocalClient`). Later: HTTP over a Unix socket with Docker-compatible routes."""
