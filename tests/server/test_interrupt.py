"""/interrupt during a long stacked run (the leak test over many runs is in test_leaks.py)."""
import time

from harness.server import error_message
from tests.server.conftest import pixels
from tests.server.stack import stack_prompt


def test_interrupt_stops_a_long_run_and_the_next_run_is_clean(server, object_info):
    clean = server.run(stack_prompt(object_info, seed=11))
    assert clean["status"]["status_str"] == "success", error_message(clean)
    expected = pixels(server.images(clean)[0])

    status, answer = server.post_prompt(stack_prompt(object_info, steps=400, seed=12))
    assert status == 200, answer
    started = time.monotonic()
    while not server.get("/queue")["queue_running"]:
        assert time.monotonic() - started < 60, "the long run never started"
        time.sleep(0.1)
    time.sleep(2.0)  # well inside sampling (400 steps take minutes on the CPU)
    assert server.request("POST", "/interrupt")[0] == 200
    entry = server.wait(answer["prompt_id"], timeout=60)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds, kinds
    assert time.monotonic() - started < 30, "the interrupt took effect too late"

    again = server.run(stack_prompt(object_info, seed=11))
    assert again["status"]["status_str"] == "success", error_message(again)
    assert (pixels(server.images(again)[0]) == expected).all(), "the interrupted run left state behind"
