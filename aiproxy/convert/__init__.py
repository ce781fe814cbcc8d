"""
Protocol conversion: a client speaking one protocol served by an upstream
speaking another (CONVERSION rules in docs/conversion.md).
"""
