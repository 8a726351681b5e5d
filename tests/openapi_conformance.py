"""Checks real responses against the gateway's OpenAPI document (used by tests/gateway/openapi_contract.rs).

Input (argv[1]): {"doc": <the document>, "observations": [{"path", "method", "status",
"headers": {lower-case name: value}, "body": <JSON or null>, "what"}]}.

Every observed status must be documented for its operation (there is no `default` to fall
back on), its body must validate against that status's schema (OpenAPI 3.0 semantics:
nullable, formats), and every gateway header it carries must be documented on that
response. Every example in the document must validate against its schema too.
Prints one line per problem and exits 1 if there is any.
"""

import json
import sys

from openapi_schema_validator import OAS30Validator

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


def validator(doc, schema):
    # `#/components/...` references resolve against the root of the schema validated.
    rooted = dict(schema)
    rooted["components"] = doc["components"]
    return OAS30Validator(rooted, format_checker=OAS30Validator.FORMAT_CHECKER)


def main():
    with open(sys.argv[1]) as f:
        data = json.load(f)
    doc = data["doc"]
    problems = []
    seen = set()

    for obs in data["observations"]:
        what = f"{obs['what']}: {obs['method'].upper()} {obs['path']} -> {obs['status']}"
        op = doc["paths"].get(obs["path"], {}).get(obs["method"])
        if op is None:
            problems.append(f"{what}: no such operation in the document")
            continue
        if "default" in op["responses"]:
            problems.append(f"{what}: the operation has a default response")
        response = op["responses"].get(str(obs["status"]))
        if response is None:
            problems.append(f"{what}: status not documented (has {sorted(op['responses'])})")
            continue
        seen.add((obs["path"], obs["method"], str(obs["status"])))
        media = response.get("content", {}).get("application/json")
        if media is not None:
            errors = sorted(
                validator(doc, media["schema"]).iter_errors(obs["body"]), key=str
            )
            for e in errors[:3]:
                at = "/".join(str(p) for p in e.absolute_path)
                problems.append(f"{what}: body at /{at}: {e.message[:300]}")
        elif obs["body"] is not None:
            problems.append(f"{what}: a JSON body, but no content documented")
        documented = {h.lower() for h in response.get("headers", {})}
        for header in GATEWAY_HEADERS:
            if header in obs["headers"] and header not in documented:
                problems.append(f"{what}: header {header} is sent but not documented")

    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                media = response.get("content", {}).get("application/json")
                if media is None:
                    continue
                examples = []
                if "example" in media:
                    examples.append(("example", media["example"]))
                for name, ex in media.get("examples", {}).items():
                    examples.append((f"examples.{name}", ex["value"]))
                for name, value in examples:
                    for e in validator(doc, media["schema"]).iter_errors(value):
                        problems.append(
                            f"{method.upper()} {path} {status} {name}: {e.message[:300]}"
                        )

    for p in problems:
        print(p)
    print(f"{len(data['observations'])} responses checked, {len(seen)} distinct "
          f"(operation, status) pairs, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
