"""/interrupt during a long stacked run, and resident memory over 20 runs that change resolution and patches."""
import json
import os

import psutil

from harness.server import error_message
from tests.server.conftest import pixels
from tests.server.stack import patch_nodes, stack_prompt


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


def test_resident_memory_settles_over_twenty_runs(server, object_info, artifacts):
    process = psutil.Process(server.process.pid)
    shapes = [(128, 128, 1), (64, 96, 2), (192, 128, 1), (96, 64, 3)]
    stacks = [patch_nodes(object_info), ("TrainFreePAG", "TrainFreeAPG"), ("TrainFreeFDG", "TrainFreeGuidanceInterval"),
              ("TrainFreeResidualCFG", "TrainFreeTwoModelGuidance", "TrainFreeNoiseDampedCFG")]
    rss = []
    for i in range(20):
        width, height, batch = shapes[i % len(shapes)]
        entry = server.run(stack_prompt(object_info, patches=stacks[i % len(stacks)], width=width, height=height,
                                        batch=batch, steps=3, seed=i))
        assert entry["status"]["status_str"] == "success", error_message(entry)
        rss.append(process.memory_info().rss / 2**20)
    with open(os.path.join(artifacts, "server_memory.json"), "w") as f:
        json.dump({"rss_mib_after_each_run": [round(r, 1) for r in rss]}, f, indent=1)
    print("resident memory after each run (MiB):", " ".join(f"{r:.0f}" for r in rss))
    # Runs 1-4 warm up (first use of every shape and patch); a leak would keep climbing through runs 5-20.
    settled, late = max(rss[4:8]), max(rss[16:20])
    assert late - settled < 40, f"resident memory climbs: {settled:.0f} MiB after run 8, {late:.0f} MiB after run 20"
