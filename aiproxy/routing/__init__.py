"""
Which upstream serves a request: the routes and their matching
(L{aiproxy.routing.routes}), built from the config
(L{aiproxy.routing.build}), the balancer of an C{ai-proxy-multi} route
(L{aiproxy.routing.balancer}) and its health checks
(L{aiproxy.routing.health}).
"""
