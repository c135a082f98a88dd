"""An agent framework running a real tool loop against lmx: the OpenAI Agents SDK, on the real
SmolLM2, through both of its model back ends (Chat Completions and Responses).

A 135M model left on `auto` would call the tool forever, so the first turn is forced
(`tool_choice="required"`, which lmx enforces with a grammar) and the loop ends by the SDK's
own means: a one-shot tool (`is_enabled` turns it off once it ran, so the next turn has no
tools and answers in text) or `tool_use_behavior="stop_on_first_tool"`."""

from __future__ import annotations

from typing import Any, Literal

import jsonschema
import openai
import pytest
from agents import (
    Agent,
    AgentHooks,
    FunctionTool,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunContextWrapper,
    Runner,
    TResponseInputItem,
    function_tool,
    set_tracing_disabled,
)

from server.runner import ServerThread

SMOL = "smollm2-135m-instruct.q4_1"
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module", autouse=True)
def _no_tracing() -> None:
    set_tracing_disabled(True)  # the SDK would export traces to OpenAI's platform


@pytest.fixture
def oai(server: ServerThread) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600
    )


class WeatherTool:
    """A python tool that records every call it really gets."""

    def __init__(self, *, one_shot: bool) -> None:
        self.calls: list[dict[str, str]] = []

        def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
            """Current weather for a city.

            Args:
                city: The city's name.
                unit: The temperature unit.
            """
            self.calls.append({"city": city, "unit": unit})
            return f"18 degrees {unit} and sunny in {city}"

        self.tool: FunctionTool = function_tool(
            get_weather, is_enabled=(lambda _ctx, _agent: not self.calls) if one_shot else True
        )

    def check(self) -> None:
        """It ran once, with arguments that match the schema the SDK sent."""
        assert len(self.calls) == 1, self.calls
        jsonschema.validate(self.calls[0], self.tool.params_json_schema)
        assert self.calls[0]["city"]


class TurnInputs(AgentHooks[Any]):
    """What the SDK sends the model on each turn."""

    def __init__(self) -> None:
        self.turns: list[list[TResponseInputItem]] = []

    async def on_llm_start(
        self,
        context: RunContextWrapper[Any],
        agent: Agent[Any],
        system_prompt: str | None,
        input_items: list[TResponseInputItem],
    ) -> None:
        self.turns.append(list(input_items))


def _agent(model: Any, weather: WeatherTool, **kw: Any) -> Agent[Any]:
    return Agent(
        name="weather",
        instructions="Answer questions about the weather. Use the tool.",
        model=model,
        tools=[weather.tool],
        model_settings=ModelSettings(
            tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=60
        ),
        **kw,
    )


@pytest.mark.parametrize("backend", ["chat_completions", "responses"])
async def test_agent_loop_calls_the_tool_then_answers(
    oai: openai.AsyncOpenAI, backend: str
) -> None:
    """model -> python tool -> model with the tool's result -> final text."""
    cls = OpenAIChatCompletionsModel if backend == "chat_completions" else OpenAIResponsesModel
    weather = WeatherTool(one_shot=True)
    hooks = TurnInputs()
    agent = _agent(cls(model=SMOL, openai_client=oai), weather, hooks=hooks)
    result = await Runner.run(agent, QUESTION, max_turns=4)

    weather.check()
    assert len(result.raw_responses) == 2 and len(hooks.turns) == 2
    # The second turn carried the call and the tool's own output back to lmx.
    call = weather.calls[0]
    sent: list[dict[str, Any]] = [dict(i) for i in hooks.turns[1]]
    assert [i["output"] for i in sent if i.get("type") == "function_call_output"] == [
        f"18 degrees {call['unit']} and sunny in {call['city']}"
    ]
    assert isinstance(result.final_output, str) and result.final_output.strip()


async def test_streamed_agent_stops_on_first_tool(oai: openai.AsyncOpenAI) -> None:
    """Streamed chat completions: the SDK reassembles the call from lmx's deltas, runs it, and
    the tool's result is the run's final output."""
    weather = WeatherTool(one_shot=False)
    agent = _agent(
        OpenAIChatCompletionsModel(model=SMOL, openai_client=oai),
        weather,
        tool_use_behavior="stop_on_first_tool",
    )
    run = Runner.run_streamed(agent, QUESTION, max_turns=2)
    kinds = [event.type async for event in run.stream_events()]

    weather.check()
    assert "raw_response_event" in kinds and run.is_complete
    call = weather.calls[0]
    assert run.final_output == f"18 degrees {call['unit']} and sunny in {call['city']}"


def test_langchain_bind_tools_loop(server: ServerThread) -> None:
    """LangChain's ChatOpenAI: `bind_tools` with a named choice, the python tool run on the
    call LangChain parsed, its ToolMessage sent back, and a text answer to finish."""
    from langchain_core.messages import BaseMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    calls: list[dict[str, str]] = []

    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Current weather for a city."""
        calls.append({"city": city, "unit": unit})
        return f"18 degrees {unit} and sunny in {city}"

    llm = ChatOpenAI(
        model=SMOL,
        base_url=server.url + "/v1",
        api_key="unused",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=60,  # type: ignore[call-arg]
        max_retries=0,
    )
    messages: list[BaseMessage] = [HumanMessage(QUESTION)]
    asked = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    assert len(asked.tool_calls) >= 1
    messages.append(asked)
    for call in asked.tool_calls:
        messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    schema = get_weather.tool_call_schema.model_json_schema()  # type: ignore[union-attr]
    assert calls == [c["args"] for c in asked.tool_calls]
    for args in calls:
        jsonschema.validate(args, schema)

    answer = llm.bind_tools([get_weather], tool_choice="none").invoke(messages)
    assert not answer.tool_calls and isinstance(answer.content, str) and answer.content.strip()
