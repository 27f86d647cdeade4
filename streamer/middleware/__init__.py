"""Built-in middlewares, and the order they wrap a topic's chain in.

Outermost first: ``trace`` (only when tracing is on, see ``streamer.tracing``; imported only
then, as it imports opentelemetry) runs each record in a consumer span; ``decode`` turns the raw
value into ``msg.decoded`` (a failure is permanent: the record is parked at once); ``retry`` turns
failures into a delayed retry or, once attempts run out, a permanent failure; ``timeout`` bounds
each attempt. The app's own middlewares come next, then the handler.
"""

from streamer.middleware.decode import DECODERS, Decoder, decode, json_decoder, resolve_decoder
from streamer.middleware.retry import RetryPolicy, retry
from streamer.middleware.timeout import timeout

#: The default order of the built-in middlewares, outermost first.
DEFAULT_ORDER = ("trace", "decode", "retry", "timeout")

__all__ = [
    "DECODERS",
    "DEFAULT_ORDER",
    "Decoder",
    "RetryPolicy",
    "decode",
    "json_decoder",
    "resolve_decoder",
    "retry",
    "timeout",
]
