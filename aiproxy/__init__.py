"""
aiproxy: a streaming AI gateway on Twisted.

Clients send chat requests; aiproxy adds the provider's credentials and
options, forwards them upstream with treq and relays the answer back,
streaming Server-Sent Events chunk by chunk through a chain of body filters.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
