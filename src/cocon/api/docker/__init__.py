"""Docker Engine API routes, one module per resource group (see cocon.api.server)."""
