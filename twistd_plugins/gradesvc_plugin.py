"""twistd plugin entry for gradesvc: ``twistd -n gradesvc``."""

from twisted.application.service import ServiceMaker

gradesvc = ServiceMaker(
    "gradesvc",
    "gradesvc.tap",
    "Replicated in-memory store of user grades over a RabbitMQ stream.",
    "gradesvc",
)
