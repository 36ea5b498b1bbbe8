"""/interrupt during a long stacked run (the leak test over many runs is in test_leaks.py)."""
import json

from harness.server import error_message
from tests.server.conftest import pixels
from tests.server.stack import stack_prompt


SAMPLER = "93"  # the KSampler of stack_prompt


def _messages(socket, prompt_id):
    """The server's JSON websocket messages about one prompt, as (type, data), as they arrive."""
    while True:
        frame = socket.recv()
        if isinstance(frame, bytes):
            continue  # binary frames carry previews
        message = json.loads(frame)
        if message.get("data", {}).get("prompt_id") == prompt_id:
            yield message["type"], message["data"]


def test_interrupt_stops_a_long_run_and_the_next_run_is_clean(server, object_info):
    import websocket
    clean = server.run(stack_prompt(object_info, seed=11))
    assert clean["status"]["status_str"] == "success", error_message(clean)
    expected = pixels(server.images(clean)[0])

    # Listen before queueing, so that no progress message is missed. The interrupt is sent once the sampler has
    # reported its first step: sampling is under way, and 3999 more steps stand between it and its end (the
    # server checks the interrupt before it reports each step), so the interrupt lands inside sampling however
    # fast the machine is. The timeout only turns a hang into a failure.
    steps = 4000
    socket = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}", timeout=300)
    try:
        status, answer = server.post_prompt(stack_prompt(object_info, steps=steps, seed=12))
        assert status == 200, answer
        reached, outcome = 0, None
        for kind, data in _messages(socket, answer["prompt_id"]):
            if kind == "progress" and data.get("node") == SAMPLER:
                assert data["max"] == steps
                if reached == 0:
                    assert server.request("POST", "/interrupt")[0] == 200
                reached = max(reached, data["value"])
            elif kind in ("execution_interrupted", "execution_success", "execution_error"):
                outcome = kind
                break
    finally:
        socket.close()
    assert outcome == "execution_interrupted", outcome
    assert 1 <= reached < steps, f"sampling reached step {reached} of {steps}"
    entry = server.wait(answer["prompt_id"], timeout=60)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds, kinds

    again = server.run(stack_prompt(object_info, seed=11))
    assert again["status"]["status_str"] == "success", error_message(again)
    assert (pixels(server.images(again)[0]) == expected).all(), "the interrupted run left state behind"
