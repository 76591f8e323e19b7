"""Drives the scripted provider with the official OpenAI and Anthropic Python clients.

Run by tests/conformance.rs, which starts the double with the script these checks expect
and passes its base URL: python conformance.py http://127.0.0.1:PORT
Every check prints one `ok` line; the first failure raises and ends with a non-zero status.
"""

import json
import sys

import anthropic
import openai

BASE = sys.argv[1]
HELLO = "Hello there, this is the scripted provider speaking."
SUNNY = "It is sunny in Paris."
WEATHER_ARGS = {"city": "Paris", "days": 2}
TOOL_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "The forecast for a city",
    "input_schema": TOOL_OPENAI["function"]["parameters"],
}


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")


def openai_checks():
    client = openai.OpenAI(base_url=BASE + "/v1", api_key="test-key", max_retries=0)
    model = "gpt-test"
    hello = [{"role": "user", "content": "say hello"}]

    r = client.chat.completions.create(model=model, messages=hello, max_tokens=50)
    c = r.choices[0]
    check("openai text", c.message.content == HELLO, repr(c.message.content))
    check("openai finish_reason stop", c.finish_reason == "stop", c.finish_reason)
    check("openai usage", r.usage.prompt_tokens == 2 and r.usage.completion_tokens == 8, r.usage)
    check("openai model", r.model == model, r.model)

    pieces, usage, finish = [], None, None
    for chunk in client.chat.completions.create(
        model=model, messages=hello, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            if ch.finish_reason:
                finish = ch.finish_reason
    check("openai stream chunks", len(pieces) > 1, pieces)
    check("openai stream text equals text", "".join(pieces) == HELLO, pieces)
    check("openai stream finish_reason", finish == "stop", finish)
    check("openai stream usage", usage is not None and usage.completion_tokens == 8, usage)

    # The SDK's own accumulator must rebuild the same completion from the chunks.
    with client.chat.completions.stream(model=model, messages=hello) as s:
        final = s.get_final_completion()
    check("openai stream helper", final.choices[0].message.content == HELLO, final)

    ask = [{"role": "user", "content": "what is the weather in Paris?"}]
    r = client.chat.completions.create(model=model, messages=ask, tools=[TOOL_OPENAI])
    c = r.choices[0]
    calls = c.message.tool_calls or []
    check("openai tool call", len(calls) == 1 and calls[0].function.name == "get_weather", calls)
    check("openai tool arguments", json.loads(calls[0].function.arguments) == WEATHER_ARGS, calls)
    check("openai finish_reason tool_calls", c.finish_reason == "tool_calls", c.finish_reason)

    with client.chat.completions.stream(model=model, messages=ask, tools=[TOOL_OPENAI]) as s:
        final = s.get_final_completion()
    scalls = final.choices[0].message.tool_calls or []
    check(
        "openai stream tool call",
        len(scalls) == 1
        and scalls[0].function.name == "get_weather"
        and json.loads(scalls[0].function.arguments) == WEATHER_ARGS
        and scalls[0].id == scalls[0].id.strip()
        and final.choices[0].finish_reason == "tool_calls",
        final,
    )

    answered = ask + [
        {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"forecast": "sun"}'},
    ]
    r = client.chat.completions.create(model=model, messages=answered, tools=[TOOL_OPENAI])
    check("openai tool result answered", r.choices[0].message.content == SUNNY, r)

    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "write a long story"}])
    check("openai finish_reason length", r.choices[0].finish_reason == "length", r)

    try:
        client.chat.completions.create(model="limited", messages=hello)
        check("openai 429", False, "no error")
    except openai.RateLimitError as e:
        check(
            "openai 429",
            e.status_code == 429 and e.response.headers.get("retry-after") == "7" and "slow down" in str(e),
            e,
        )


def anthropic_checks():
    client = anthropic.Anthropic(base_url=BASE, api_key="test-key", max_retries=0)
    model = "claude-test"
    hello = [{"role": "user", "content": "say hello"}]

    r = client.messages.create(model=model, max_tokens=50, messages=hello, system="Be brief.")
    check("anthropic text", [b.type for b in r.content] == ["text"] and r.content[0].text == HELLO, r.content)
    check("anthropic stop_reason end_turn", r.stop_reason == "end_turn", r.stop_reason)
    check("anthropic usage", r.usage.input_tokens == 4 and r.usage.output_tokens == 8, r.usage)
    check("anthropic model", r.model == model, r.model)

    with client.messages.stream(model=model, max_tokens=50, messages=hello, system="Be brief.") as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    check("anthropic stream chunks", len(pieces) > 1, pieces)
    check("anthropic stream text equals text", "".join(pieces) == HELLO, pieces)
    check("anthropic stream final message", final.content[0].text == HELLO and final.stop_reason == "end_turn", final)
    check("anthropic stream usage", final.usage.output_tokens == 8 and final.usage.input_tokens == 4, final.usage)

    ask = [{"role": "user", "content": "what is the weather in Paris?"}]
    r = client.messages.create(model=model, max_tokens=50, messages=ask, tools=[TOOL_ANTHROPIC])
    uses = [b for b in r.content if b.type == "tool_use"]
    check("anthropic tool_use", len(uses) == 1 and uses[0].name == "get_weather", r.content)
    check("anthropic tool input", uses[0].input == WEATHER_ARGS, uses[0].input)
    check("anthropic stop_reason tool_use", r.stop_reason == "tool_use", r.stop_reason)

    with client.messages.stream(model=model, max_tokens=50, messages=ask, tools=[TOOL_ANTHROPIC]) as s:
        final = s.get_final_message()
    suses = [b for b in final.content if b.type == "tool_use"]
    check(
        "anthropic stream tool_use",
        len(suses) == 1 and suses[0].input == WEATHER_ARGS and final.stop_reason == "tool_use",
        final,
    )

    answered = ask + [
        {"role": "assistant", "content": [u.model_dump() for u in uses]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": '{"forecast": "sun"}'}],
        },
    ]
    r = client.messages.create(model=model, max_tokens=50, messages=answered, tools=[TOOL_ANTHROPIC])
    check("anthropic tool result answered", r.content[0].text == SUNNY, r)

    r = client.messages.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "write a long story"}])
    check("anthropic stop_reason max_tokens", r.stop_reason == "max_tokens", r.stop_reason)

    try:
        client.messages.create(model="limited", max_tokens=5, messages=hello)
        check("anthropic 429", False, "no error")
    except anthropic.RateLimitError as e:
        check(
            "anthropic 429",
            e.status_code == 429 and e.response.headers.get("retry-after") == "7" and "slow down" in str(e),
            e,
        )


openai_checks()
anthropic_checks()
print("conformance: all checks passed")
