"""
Token budgets (C{ai-rate-limiting}): what a request may spend, counted in
fixed windows, in the process or in Redis shared by every gateway.
"""
