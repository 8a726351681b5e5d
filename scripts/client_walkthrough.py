#!/usr/bin/env python3
"""The README walkthrough through a client generated from the gateway's OpenAPI document.

Run by scripts/check-generated-client inside the venv the generated `deltastream_client` is
installed in: python3 client_walkthrough.py BASE_URL OPENAPI_JSON

Every answer is read through the generated functions and TYPED models, and fails unless:
- it is the expected status and the expected model class (a 401 from the service is a
  `ServiceError`, one from the gateway an `Error`; never a dict, never None);
- every field has the type its annotation promises, recursively (the generated code
  `cast`s primitives without checking them: this is the check it does not make);
- the model turned back into JSON is the body that arrived: no field dropped, none added;
- the gateway headers it carries are documented on that status.
The client raises on any undocumented status (raise_on_unexpected_status=True). Then every
example in the document is parsed through its model the same way.
"""

import datetime
import enum
import json
import sys
import types
import typing

import attrs

import deltastream_client.models as models
from deltastream_client import AuthenticatedClient, Client
from deltastream_client.api.analytics import (
    get_analytics_pcr_product,
    get_analytics_volatility_surface_product,
)
from deltastream_client.api.authentication import post_auth_login, post_auth_register
from deltastream_client.api.data import (
    get_data_chain_product,
    get_data_products,
    get_data_underlying_product,
)
from deltastream_client.api.gateway import get_health
from deltastream_client.api.user import get_user_me
from deltastream_client.types import Unset

GATEWAY_HEADERS = [
    "x-request-id",
    "ratelimit",
    "ratelimit-policy",
    "retry-after",
    "x-cache",
    "age",
    "x-upstream-attempts",
    "www-authenticate",
]

checked = 0


class Mismatch(Exception):
    pass


def hints(cls):
    namespace = dict(vars(models))
    namespace.update(vars(sys.modules[cls.__module__]))
    namespace["Unset"] = Unset
    return typing.get_type_hints(cls, globalns=namespace)


def check_type(value, hint, at):
    """Fails unless `value` is what `hint` (a generated annotation) says, recursively."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        failures = []
        for option in typing.get_args(hint):
            try:
                check_type(value, option, at)
                return
            except Mismatch as e:
                failures.append(str(e))
        raise Mismatch(f"{at}: {value!r} is none of {hint} ({'; '.join(failures)})")
    if origin is list:
        if not isinstance(value, list):
            raise Mismatch(f"{at}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        for i, v in enumerate(value):
            check_type(v, item, f"{at}[{i}]")
        return
    if hint is type(None):
        if value is not None:
            raise Mismatch(f"{at}: expected null, got {value!r}")
        return
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is datetime.date:
        ok = isinstance(value, datetime.date) and not isinstance(value, datetime.datetime)
    elif isinstance(hint, type) and attrs.has(hint):
        if not isinstance(value, hint):
            raise Mismatch(f"{at}: expected {hint.__name__}, got {type(value).__name__}")
        field_hints = hints(hint)
        for field in attrs.fields(hint):
            if field.name == "additional_properties":
                if value.additional_properties:
                    raise Mismatch(
                        f"{at}: fields the document does not name: {sorted(value.additional_properties)}"
                    )
                continue
            check_type(getattr(value, field.name), field_hints[field.name], f"{at}.{field.name}")
        return
    elif isinstance(hint, type):
        ok = isinstance(value, hint)
        if ok and issubclass(hint, enum.Enum):
            ok = type(value) is hint
    else:
        raise Mismatch(f"{at}: cannot check annotation {hint!r}")
    if not ok:
        raise Mismatch(f"{at}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def same_json(sent, received, at="$"):
    """`sent` (the model's to_dict) is the body `received`; datetimes compare as instants."""
    if isinstance(sent, dict) and isinstance(received, dict):
        if sent.keys() != received.keys():
            raise Mismatch(
                f"{at}: keys differ: model {sorted(sent)} vs body {sorted(received)}"
            )
        for k in sent:
            same_json(sent[k], received[k], f"{at}.{k}")
    elif isinstance(sent, list) and isinstance(received, list):
        if len(sent) != len(received):
            raise Mismatch(f"{at}: {len(sent)} items in the model, {len(received)} in the body")
        for i, (s, r) in enumerate(zip(sent, received)):
            same_json(s, r, f"{at}[{i}]")
    elif isinstance(sent, str) and isinstance(received, str) and sent != received:
        try:
            equal = datetime.datetime.fromisoformat(sent) == datetime.datetime.fromisoformat(
                received
            )
        except ValueError:
            equal = False
        if not equal:
            raise Mismatch(f"{at}: model {sent!r} vs body {received!r}")
    elif sent != received or isinstance(sent, bool) != isinstance(received, bool):
        raise Mismatch(f"{at}: model {sent!r} vs body {received!r}")


class Walkthrough:
    def __init__(self, base_url, doc):
        self.base_url = base_url
        self.doc = doc
        self.failures = []

    def expect(self, what, call, status, model, path, method="get"):
        """Runs `call` (a generated sync_detailed) and checks its answer; returns the model."""
        global checked
        try:
            response = call()
        except Exception as e:  # noqa: BLE001 - an UnexpectedStatus or a parse error is the finding
            self.failures.append(f"{what}: {type(e).__name__}: {e}")
            print(f"FAIL {what}: {type(e).__name__}: {e}")
            return None
        parsed = response.parsed
        try:
            if int(response.status_code) != status:
                raise Mismatch(f"status {int(response.status_code)}, expected {status}")
            if type(parsed) is not model:
                raise Mismatch(f"parsed as {type(parsed).__name__}, expected {model.__name__}")
            check_type(parsed, model, model.__name__)
            same_json(parsed.to_dict(), json.loads(response.content))
            documented = {
                h.lower()
                for h in self.doc["paths"][path][method]["responses"][str(status)].get(
                    "headers", {}
                )
            }
            sent = {h.lower() for h in response.headers if h.lower() in GATEWAY_HEADERS}
            if not sent <= documented:
                raise Mismatch(f"headers sent but not documented: {sorted(sent - documented)}")
        except Mismatch as e:
            self.failures.append(f"{what}: {e}")
            print(f"FAIL {what}: {e}")
            return None
        checked += 1
        print(f"ok   {what}: {status} {model.__name__}")
        return parsed

    def examples(self):
        """Every documented example parses into its model, field by field."""
        global checked
        for path, ops in self.doc["paths"].items():
            for method, op in ops.items():
                for status, response in op["responses"].items():
                    media = response.get("content", {}).get("application/json")
                    if not media:
                        continue
                    schema = media["schema"]
                    refs = [schema.get("$ref")] + [s.get("$ref") for s in schema.get("oneOf", [])]
                    named = [getattr(models, r.rsplit("/", 1)[1]) for r in refs if r]
                    values = [media["example"]] if "example" in media else []
                    values += [e["value"] for e in media.get("examples", {}).values()]
                    for value in values:
                        where = f"example of {method.upper()} {path} {status}"
                        for model in named:
                            try:
                                parsed = model.from_dict(value)
                                check_type(parsed, model, model.__name__)
                                same_json(parsed.to_dict(), value)
                                checked += 1
                                break
                            except (Mismatch, KeyError, TypeError, ValueError):
                                continue
                        else:
                            if named:
                                self.failures.append(f"{where}: parses into none of {named}")
                                print(f"FAIL {where}: parses into none of {named}")


def main():
    base_url, doc_path = sys.argv[1], sys.argv[2]
    with open(doc_path) as f:
        doc = json.load(f)
    w = Walkthrough(base_url, doc)
    client = Client(base_url=base_url, raise_on_unexpected_status=True, timeout=30.0)
    M = models
    email = "ada@example.com"

    w.expect("health", lambda: get_health.sync_detailed(client=client),
             200, M.GetHealthResponse200, "/health")

    register = M.PostAuthRegisterBody(email=email, password="correct-horse", name="Ada")
    w.expect("register", lambda: post_auth_register.sync_detailed(client=client, body=register),
             201, M.Session, "/api/auth/register", "post")
    w.expect("register again: the service's 409",
             lambda: post_auth_register.sync_detailed(client=client, body=register),
             409, M.ServiceError, "/api/auth/register", "post")
    short = M.PostAuthRegisterBody(email="bo@example.com", password="short", name="Bo")
    w.expect("a short password: the service's 400",
             lambda: post_auth_register.sync_detailed(client=client, body=short),
             400, M.ServiceError, "/api/auth/register", "post")
    wrong = M.PostAuthLoginBody(email=email, password="wrong-horse")
    w.expect("a wrong password: the service's 401",
             lambda: post_auth_login.sync_detailed(client=client, body=wrong),
             401, M.ServiceError, "/api/auth/login", "post")
    session = w.expect(
        "login",
        lambda: post_auth_login.sync_detailed(
            client=client, body=M.PostAuthLoginBody(email=email, password="correct-horse")
        ),
        200, M.Session, "/api/auth/login", "post",
    )
    if session is None:
        print("login failed: the rest needs its token")
        sys.exit(1)
    # The token, from the typed model.
    authed = AuthenticatedClient(
        base_url=base_url, token=session.token, raise_on_unexpected_status=True, timeout=30.0
    )
    me = w.expect("me", lambda: get_user_me.sync_detailed(client=authed),
                  200, M.User, "/api/user/me")
    if me is not None and me.email != email:
        w.failures.append(f"me: email {me.email!r}")
    forged = AuthenticatedClient(base_url=base_url, token="not.a.token",
                                 raise_on_unexpected_status=True)
    w.expect("me with a forged token: the gateway's 401",
             lambda: get_user_me.sync_detailed(client=forged), 401, M.Error, "/api/user/me")

    ticks = w.expect("underlying",
                     lambda: get_data_underlying_product.sync_detailed("NIFTY", client=client, limit=5),
                     200, M.UnderlyingTicks, "/api/data/underlying/{product}")
    if ticks is not None and len(ticks.ticks) != 5:
        w.failures.append(f"underlying: {len(ticks.ticks)} ticks, asked for 5")
    w.expect("an unknown product: the service's 404",
             lambda: get_data_underlying_product.sync_detailed("NOPE", client=client),
             404, M.ServiceError, "/api/data/underlying/{product}")
    w.expect("an empty product: the gateway's 404",
             lambda: get_data_underlying_product.sync_detailed("", client=client),
             404, M.Error, "/api/data/underlying/{product}")
    w.expect("limit 0: the service's 400",
             lambda: get_data_underlying_product.sync_detailed("NIFTY", client=client, limit=0),
             400, M.ServiceError, "/api/data/underlying/{product}")
    chain = w.expect(
        "chain",
        lambda: get_data_chain_product.sync_detailed(
            "NIFTY", client=client, expiry=datetime.date(2025, 1, 30)
        ),
        200, M.OptionChain, "/api/data/chain/{product}",
    )
    if chain is not None and {row.expiry for row in chain.chain} != {datetime.date(2025, 1, 30)}:
        w.failures.append("chain: rows of other expiries")
    w.expect("an unlisted expiry: the service's 404",
             lambda: get_data_chain_product.sync_detailed(
                 "NIFTY", client=client, expiry=datetime.date(2025, 1, 10)),
             404, M.ServiceError, "/api/data/chain/{product}")
    products = w.expect("products", lambda: get_data_products.sync_detailed(client=client),
                        200, M.Products, "/api/data/products")
    if products is not None and products.count != len(products.products):
        w.failures.append("products: count differs from the list")
    w.expect("pcr", lambda: get_analytics_pcr_product.sync_detailed("NIFTY", client=client),
             200, M.PutCallRatio, "/api/analytics/pcr/{product}")
    w.expect("pcr of one expiry",
             lambda: get_analytics_pcr_product.sync_detailed(
                 "BANKNIFTY", client=client, expiry=datetime.date(2025, 2, 27)),
             200, M.PutCallRatio, "/api/analytics/pcr/{product}")
    w.expect("volatility surface",
             lambda: get_analytics_volatility_surface_product.sync_detailed("NIFTY", client=client),
             200, M.VolatilitySurface, "/api/analytics/volatility-surface/{product}")

    # The demo config allows 6 auth calls a minute; 5 were made. Then the gateway's 429.
    limited = None
    for _ in range(10):
        r = post_auth_login.sync_detailed(client=client, body=wrong)
        if int(r.status_code) == 429:
            limited = r
            break
    if limited is None:
        w.failures.append("429: the auth policy never limited")
    else:
        w.expect("over the auth limit: the gateway's 429",
                 lambda: post_auth_login.sync_detailed(client=client, body=wrong),
                 429, M.Error, "/api/auth/login", "post")
        if "retry-after" not in {h.lower() for h in limited.headers}:
            w.failures.append("429 without Retry-After")

    w.examples()
    for f in w.failures:
        print(f"FAILED: {f}")
    print(f"{checked} passed, {len(w.failures)} failed")
    sys.exit(1 if w.failures else 0)


if __name__ == "__main__":
    main()
