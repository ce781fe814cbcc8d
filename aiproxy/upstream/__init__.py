"""
The upstream side: the treq client of a route (L{aiproxy.upstream.client}),
the providers (L{aiproxy.upstream.providers}), the shaping of the request
for an instance (L{aiproxy.upstream.request}) and what the client's
failures mean (L{aiproxy.upstream.failures}).
"""
