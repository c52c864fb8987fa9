"""The HVE adapter: SMTP sessions, TLS and AUTH, credentials, and the account limits."""
