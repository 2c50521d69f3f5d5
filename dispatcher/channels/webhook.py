"""HTTP webhooks: a JSON body per message, POSTed (or PUT) to a URL, with optional signing.

Two families of receivers are served by one adapter:

* a generic endpoint: the body comes from a Jinja2 JSON template (or a default object with
  every message field), optionally signed with HMAC-SHA256 in a header;
* a chat robot preset (WeCom, DingTalk, Feishu/Lark, Slack): the documented text-message
  payload and signing of that robot, and its habit of answering HTTP 200 with an error code in
  the JSON body, which is classified here like any other refusal.

Outcome rules: 2xx accepted (unless a robot's error code says otherwise), 429 and 5xx retry,
other 4xx failed; no connection means retry; a request that left without an answer coming back
(read timeout, dropped connection) is ambiguous: the receiver may have acted on it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal
from urllib.parse import quote

import httpx
from jinja2 import StrictUndefined, Template, TemplateSyntaxError, Undefined, UndefinedError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import Field, SecretStr, field_validator, model_validator

from dispatcher.channels.base import (
    Channel,
    ChannelContext,
    ChannelSettings,
    OutboundMessage,
    SendResult,
)
from dispatcher.errors import ChannelError

Preset = Literal["wecom", "dingtalk", "feishu", "slack"]

#: Robot error codes that mean "too fast, try later" rather than "this will never work", with
#: how long the robot's documentation says the throttle lasts (None: let the engine back off).
#: WeCom: 45009 "api freq out of limit" (20 messages a minute), -1 "system busy".
#: DingTalk: 130101 "send too fast" (20 a minute, then throttled 10 minutes), -1 "system busy".
#: Feishu/Lark: 11232 "frequency limited".
ROBOT_RETRY_CODES: Final[Mapping[str, Mapping[int, float | None]]] = MappingProxyType(
    {
        "wecom": MappingProxyType({45009: 60.0, -1: None}),
        "dingtalk": MappingProxyType({130101: 600.0, -1: None}),
        "feishu": MappingProxyType({11232: None}),
    }
)
_SIGNED_PRESETS: Final = frozenset({"dingtalk", "feishu"})
_REASON_LIMIT: Final = 300


class WebhookSettings(ChannelSettings):
    """Where to send, what body to send, and how to sign it."""

    url: str
    method: Literal["POST", "PUT"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    body_template: str | None = None
    preset: Preset | None = None
    secret: SecretStr | None = None
    hmac_secret: SecretStr | None = None
    hmac_header: str = "X-Dispatcher-Signature"
    hmac_timestamp_header: str = "X-Dispatcher-Timestamp"
    id_field: str | None = None
    timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=20, ge=1, le=1000)

    @field_validator("method", mode="before")
    @classmethod
    def _upper_method(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _is_http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value.replace("{address}", "address"))
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value

    @field_validator("body_template")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                _body_environment().parse(value)
            except TemplateSyntaxError as exc:
                raise ValueError(f"template line {exc.lineno}: {exc.message}") from exc
        return value

    @model_validator(mode="after")
    def _secret_fits_preset(self) -> WebhookSettings:
        if self.secret is not None and self.preset not in _SIGNED_PRESETS:
            raise ValueError(
                "secret signs DingTalk and Feishu robot requests only; "
                "for other endpoints use hmac_secret"
            )
        return self


def _body_environment() -> SandboxedEnvironment:
    """The sandbox body templates run in: strict undefined, a JSON-safe `tojson`."""
    environment = SandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
    )
    environment.filters["tojson"] = _tojson
    return environment


def _tojson(value: Any) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a JSON body wants plain JSON, and
    # keeps Chinese text readable for whoever debugs the receiver.
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises here, naming the missing variable
        raise UndefinedError("tojson was given an undefined value")
    return json.dumps(value, ensure_ascii=False)


class WebhookChannel(Channel):
    """Sends each message as one HTTP request to a configured webhook."""

    settings_model: ClassVar[type[ChannelSettings]] = WebhookSettings
    address_kind = "any"

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        if not isinstance(settings, WebhookSettings):
            raise ChannelError(f"channel {name!r}: expected WebhookSettings, got {type(settings)}")
        super().__init__(name, settings, context)
        self.webhook_settings = settings
        self._template: Template | None = None
        if settings.body_template is not None:
            self._template = _body_environment().from_string(settings.body_template)
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Open the channel's HTTP client (one connection pool for all sends)."""
        settings = self.webhook_settings
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout_s),
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_connections,
            ),
            follow_redirects=False,
        )

    async def close(self) -> None:
        """Close the HTTP client and its connections."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def send(self, message: OutboundMessage) -> SendResult:
        """Render, sign and send one request, and classify the answer."""
        if self._client is None:
            raise ChannelError(f"channel {self.name!r}: send() called before start()")
        settings = self.webhook_settings
        try:
            url, body, headers = self._request(message, int(time.time()))
        except _BadRequest as exc:
            return SendResult.failed(exc.code, exc.reason)
        try:
            response = await self._client.request(
                settings.method, url, content=body, headers=headers
            )
        except (
            httpx.ConnectError,
            httpx.ConnectTimeout,
            httpx.PoolTimeout,
            httpx.ProxyError,
        ) as exc:
            return SendResult.retry("http-connect", _exception_text(exc))
        except (httpx.WriteError, httpx.WriteTimeout) as exc:
            # The request did not finish leaving, so the receiver cannot have acted on it.
            return SendResult.retry("http-write", _exception_text(exc))
        except httpx.ReadTimeout as exc:
            return SendResult.ambiguous("http-read-timeout", _exception_text(exc))
        except httpx.TransportError as exc:
            # Connection dropped after the request went out: the receiver may have acted.
            return SendResult.ambiguous("http-no-response", _exception_text(exc))
        result = classify_response(response, settings.preset, settings.id_field)
        self.context.logger.debug(
            "channel %s: delivery %s -> %s %s",
            self.name,
            message.delivery_id,
            result.outcome.value,
            result.error_code or "",
        )
        return result

    def _request(
        self, message: OutboundMessage, timestamp: int
    ) -> tuple[httpx.URL, bytes, dict[str, str]]:
        """URL, body and headers of the request for `message`, signed as configured."""
        settings = self.webhook_settings
        try:
            url = httpx.URL(settings.url.replace("{address}", quote(message.address, safe="")))
        except httpx.InvalidURL as exc:
            raise _BadRequest("bad-url", f"address does not make a valid URL: {exc}") from exc
        payload, body_text = self._payload(message)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "X-Dispatcher-Delivery": str(message.delivery_id),
            **settings.headers,
        }
        secret = settings.secret.get_secret_value() if settings.secret else None
        if settings.preset == "dingtalk" and secret is not None:
            millis = str(timestamp * 1000)
            url = url.copy_merge_params(
                {"timestamp": millis, "sign": dingtalk_sign(secret, millis)}
            )
        if settings.preset == "feishu" and secret is not None:
            if not isinstance(payload, dict):
                raise _BadRequest("bad-body", "a signed Feishu body must be a JSON object")
            stamp = str(timestamp)
            payload = {**payload, "timestamp": stamp, "sign": feishu_sign(secret, stamp)}
            body_text = None
        body = (body_text or json.dumps(payload, ensure_ascii=False)).encode()
        if settings.hmac_secret is not None:
            signature = hmac_signature(settings.hmac_secret.get_secret_value(), timestamp, body)
            headers[settings.hmac_header] = signature
            headers[settings.hmac_timestamp_header] = str(timestamp)
        return url, body, headers

    def _payload(self, message: OutboundMessage) -> tuple[object, str | None]:
        """The JSON value to send, and the template's exact text when a template made it.

        The template's text is sent as rendered (the receiver, and the signature, see what the
        operator wrote); the preset's object, or the default object of every message field, is
        serialised here.
        """
        variables: dict[str, Any] = {
            "address": message.address,
            "body": message.body,
            "subject": message.subject,
            "campaign": message.campaign,
            "stage": message.stage,
            "delivery_id": message.delivery_id,
            "metadata": dict(message.metadata),
        }
        if self._template is not None:
            try:
                text = self._template.render(variables)
            except Exception as exc:  # the sandbox boundary: any template failure is bad-body
                raise _BadRequest("bad-body", f"body_template does not render: {exc}") from exc
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _BadRequest(
                    "bad-body",
                    # Not the rendered text: it holds the address, which reports must not show.
                    f"body_template did not render JSON: {exc.msg} at line {exc.lineno} "
                    f"column {exc.colno} of the rendered text",
                ) from exc
            return value, text
        if self.webhook_settings.preset is not None:
            return preset_payload(self.webhook_settings.preset, message.body), None
        return variables, None


class _BadRequest(Exception):
    """The request for this message cannot be built (bad URL, bad body): it never will be."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def preset_payload(preset: Preset, text: str) -> dict[str, Any]:
    """The documented plain-text message of each robot."""
    if preset in ("wecom", "dingtalk"):
        return {"msgtype": "text", "text": {"content": text}}
    if preset == "feishu":
        return {"msg_type": "text", "content": {"text": text}}
    return {"text": text}  # slack


def dingtalk_sign(secret: str, timestamp_ms: str) -> str:
    """DingTalk robot signature: base64(HMAC-SHA256(key=secret, msg="{timestamp}\\n{secret}"))."""
    digest = hmac.new(
        secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode("ascii")


def feishu_sign(secret: str, timestamp_s: str) -> str:
    """Feishu/Lark bot signature: base64(HMAC-SHA256(key="{timestamp}\\n{secret}", msg=""))."""
    digest = hmac.new(f"{timestamp_s}\n{secret}".encode(), b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def hmac_signature(secret: str, timestamp: int, body: bytes) -> str:
    """Generic signature header value: `sha256=` + hex HMAC-SHA256 of "{timestamp}." + body."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def classify_response(
    response: httpx.Response, preset: Preset | None, id_field: str | None
) -> SendResult:
    """Turn an HTTP answer into a SendResult, reading robots' in-body error codes."""
    status = response.status_code
    if 200 <= status < 300:
        data = _json_or_none(response)
        if preset is not None:
            refusal = _robot_refusal(preset, data)
            if refusal is not None:
                return refusal
        return SendResult.accepted(_provider_id(data, id_field) or uuid.uuid4().hex)
    code = f"http-{status}"
    reason = _response_reason(response)
    if status == 429 or status == 408 or status >= 500:
        return SendResult.retry(code, reason, retry_after=_retry_after(response))
    if 300 <= status < 400:
        location = response.headers.get("Location", "?")
        return SendResult.failed(code, f"redirected to {location}: set the channel's url to it")
    return SendResult.failed(code, reason)


def _robot_refusal(preset: Preset, data: object) -> SendResult | None:
    """A robot's HTTP-200 refusal (`errcode` or `code` not 0), or None when it accepted."""
    if not isinstance(data, dict):
        return None
    if preset in ("wecom", "dingtalk"):
        code, message = data.get("errcode"), data.get("errmsg")
    elif preset == "feishu":
        code, message = data.get("code", data.get("StatusCode")), data.get("msg")
    else:
        return None
    if code is None or code == 0 or not isinstance(code, int):
        return None
    reason = _clip(str(message or "no message"))
    retry_codes = ROBOT_RETRY_CODES.get(preset, {})
    if code in retry_codes:
        return SendResult.retry(f"{preset}-{code}", reason, retry_after=retry_codes[code])
    return SendResult.failed(f"{preset}-{code}", reason)


def _json_or_none(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:  # not JSON (Slack answers plain "ok"), or not UTF-8
        return None


def _provider_id(data: object, id_field: str | None) -> str | None:
    """The value at dotted path `id_field` in the JSON answer, when there is one."""
    if id_field is None:
        return None
    for key in id_field.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    if isinstance(data, str | int) and not isinstance(data, bool) and str(data):
        return str(data)
    return None


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _response_reason(response: httpx.Response) -> str:
    text = response.text.strip()
    head = f"HTTP {response.status_code} {response.reason_phrase}".strip()
    return f"{head}: {_clip(text)}" if text else head


def _exception_text(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 1] + "…"
