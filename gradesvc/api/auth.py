"""HTTP Basic auth for the write port, built from ``twisted.cred``.

A :class:`~twisted.cred.portal.Portal` with one constant-time
username/password checker; :func:`basic_auth_guard` decodes the header with
``twisted.web.guard.BasicCredentialFactory`` and logs in through the portal
as soon as a request's headers are in, so a request without valid
credentials is answered 401 before its body is read.  (``guard``'s own
``HTTPAuthSessionWrapper`` runs only once the body is in and answers in plain
text; the contract wants every error as JSON.)
"""

from __future__ import annotations

import hmac
from typing import Any, List, Tuple, Union

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.guard import BasicCredentialFactory
from zope.interface import Interface, implementer

from svckit.responses import HTTPError
from svckit.web import Guard

REALM = "gradesvc"


class IAdmin(Interface):
    """The avatar of a user allowed to write."""


@implementer(IAdmin)
class Admin:
    """The one admin, by name."""

    def __init__(self, name: bytes) -> None:
        self.name = name


@implementer(ICredentialsChecker)
class AdminChecker:
    """Accepts exactly one username and password, compared in constant time."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, username: str, password: str) -> None:
        self._username = username.encode("utf-8")
        self._password = password.encode("utf-8")

    def requestAvatarId(self, creds: Any) -> defer.Deferred[Union[bytes, Tuple[()]]]:
        """The username when both parts match, else ``UnauthorizedLogin``."""
        user_ok = hmac.compare_digest(creds.username, self._username)
        password_ok = hmac.compare_digest(creds.password, self._password)
        if user_ok and password_ok:
            return defer.succeed(creds.username)
        return defer.fail(error.UnauthorizedLogin("wrong username or password"))


@implementer(portal.IRealm)
class AdminRealm:
    """Every authenticated user is an :class:`Admin`."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Tuple[Any, Any, Any]:
        """An :class:`Admin` for ``IAdmin``."""
        if IAdmin in interfaces:
            return IAdmin, Admin(avatarId), lambda: None
        raise NotImplementedError()


def admin_portal(username: str, password: str) -> portal.Portal:
    """A portal that lets in exactly one admin."""
    return portal.Portal(AdminRealm(), [AdminChecker(username, password)])


def unauthorized(message: str) -> HTTPError:
    """401 with the Basic challenge."""
    return HTTPError(401, message, {"WWW-Authenticate": f'Basic realm="{REALM}"'})


def basic_auth_guard(realm_portal: portal.Portal) -> Guard:
    """A guard that logs a request in with its Basic credentials, or refuses it.

    The portal must answer at once (the checker here does): a guard runs
    while the request's headers are being handled, before its body.
    """
    factory = BasicCredentialFactory(REALM)

    def guard(request: server.Request) -> None:
        header = request.requestHeaders.getRawHeaders(b"authorization")
        if not header:
            raise unauthorized("credentials required")
        scheme, _, response = header[0].partition(b" ")
        if scheme.lower() != b"basic":
            raise unauthorized("Basic credentials required")
        try:
            creds = factory.decode(response.strip(), request)
        except error.LoginFailed:
            raise unauthorized("malformed Basic credentials") from None
        outcome: List[Any] = []
        realm_portal.login(creds, None, IAdmin).addBoth(outcome.append)
        if not outcome or isinstance(outcome[0], Failure):
            if outcome:
                outcome[0].trap(error.UnauthorizedLogin, error.UnhandledCredentials)
            raise unauthorized("wrong username or password")
        request.principal = outcome[0][1]  # type: ignore[attr-defined]

    return guard
