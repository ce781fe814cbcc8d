"""
The stream as it passes through: the incremental SSE and AWS EventStream
decoders, and the protocol observers that read figures and text from the
decoded events.
"""
