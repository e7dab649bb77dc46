"""Forwarding a request: the gateway's handler (:mod:`.proxy`), one request's way through the backends
(:mod:`.forwarding`), the answer relayed and timed (:mod:`.relay`), RFC 9110's header rules
(:mod:`.headerrules`), the HTTP/1.1 client to the backends (:mod:`.upstream`, its response parser
:mod:`.responseparser` and its idle connections :mod:`.connections`), the request-target (:mod:`.target`) and
the retry budget (:mod:`.retries`).
"""
