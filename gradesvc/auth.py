"""HTTP Basic auth for the write port, built from ``twisted.cred``.

A :class:`~twisted.cred.portal.Portal` with one constant-time
username/password checker, and :class:`BasicAuthResource`, which decodes the
header with ``twisted.web.guard.BasicCredentialFactory``.  (``guard``'s own
``HTTPAuthSessionWrapper`` answers 401 with a plain-text body; the contract
wants every error as JSON, so the wrapper here is ours and a dozen lines.)
"""

from __future__ import annotations

import hmac
from typing import Any, Tuple, Union

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.web import resource, server
from twisted.web.guard import BasicCredentialFactory
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from svckit.jsonweb import HTTPError, error_response, write_response

REALM = "gradesvc"


@implementer(ICredentialsChecker)
class AdminChecker:
    """Accepts exactly one username and password, compared in constant time."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, username: str, password: str) -> None:
        self._username = username.encode("utf-8")
        self._password = password.encode("utf-8")

    def requestAvatarId(self, creds: Any) -> "defer.Deferred[bytes]":
        """The username when both parts match, else ``UnauthorizedLogin``."""
        user_ok = hmac.compare_digest(creds.username, self._username)
        password_ok = hmac.compare_digest(creds.password, self._password)
        if user_ok and password_ok:
            return defer.succeed(creds.username)
        return defer.fail(error.UnauthorizedLogin("wrong username or password"))


@implementer(portal.IRealm)
class SingleResourceRealm:
    """Every authenticated user gets the same resource."""

    def __init__(self, avatar: IResource) -> None:
        self._avatar = avatar

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Tuple[Any, Any, Any]:
        """Return the protected resource for ``IResource``."""
        if IResource in interfaces:
            return IResource, self._avatar, lambda: None
        raise NotImplementedError()


def unauthorized(request: IRequest, message: str) -> bytes:
    """A 401 JSON answer with the Basic challenge."""
    return write_response(
        request,
        error_response(HTTPError(401, message, {"WWW-Authenticate": f'Basic realm="{REALM}"'})),
    )


class BasicAuthResource(resource.Resource):
    """Authenticate with Basic auth through ``portal``, then render its avatar."""

    isLeaf = True

    def __init__(self, realm_portal: portal.Portal) -> None:
        super().__init__()
        self._portal = realm_portal
        self._factory = BasicCredentialFactory(REALM)

    def render(self, request: IRequest) -> Union[bytes, int]:  # type: ignore[override]
        """Log in, then let the avatar render the request."""
        header = request.getHeader(b"authorization")
        if not header:
            return unauthorized(request, "credentials required")
        scheme, _, response = header.partition(b" ")
        if scheme.lower() != b"basic":
            return unauthorized(request, "Basic credentials required")
        try:
            creds = self._factory.decode(response.strip(), request)
        except error.LoginFailed:
            return unauthorized(request, "malformed Basic credentials")
        d = self._portal.login(creds, None, IResource)

        def render_avatar(result: Tuple[Any, IResource, Any]) -> None:
            body = resource.getChildForRequest(result[1], request).render(request)
            if body != server.NOT_DONE_YET and not request.finished:  # type: ignore[attr-defined]
                request.write(body)
                request.finish()

        def denied(failure: Any) -> None:
            failure.trap(error.UnauthorizedLogin, error.UnhandledCredentials)
            request.write(unauthorized(request, "wrong username or password"))
            request.finish()

        d.addCallbacks(render_avatar, denied)
        return server.NOT_DONE_YET


def admin_portal(protected: IResource, username: str, password: str) -> portal.Portal:
    """A portal that gives ``protected`` to the one admin user."""
    return portal.Portal(SingleResourceRealm(protected), [AdminChecker(username, password)])
