"""What the provider tests send and look for: one JSON schema, one request shape, a file scan for leaks."""

from llamaduo_nb.llm.base import ChatRequest

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "score": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["answer", "score"],
}


def request(prompt: str, schema=SCHEMA, **kw) -> ChatRequest:
    return ChatRequest(
        messages=({"role": "system", "content": "You are a careful assistant."}, {"role": "user", "content": prompt}),
        json_schema=schema, max_tokens=64, **kw,
    )


def files_contain(root, needle: str) -> list:
    data = needle.encode()
    return [p for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]
