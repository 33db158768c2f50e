"""OpenAI's speech endpoint and the browser page, on the gateway's HTTP port."""
