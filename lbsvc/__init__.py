"""lbsvc: a rate-limited HTTP gateway with per-user API keys."""
