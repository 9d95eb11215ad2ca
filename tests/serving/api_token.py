"""The API token the serving tests write with (a module, so test files can import it)."""

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
