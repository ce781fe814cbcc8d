"""
Who is calling: consumers, their keys, and the C{key-auth} check of a route.
"""
