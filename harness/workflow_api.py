"""Turn a workflow saved by ComfyUI's editor (UI / graph format) into the API format the backend executes.

ComfyUI converts only in its frontend, so this follows the frontend's rules, driven by the node definitions
ComfyUI reports (``INPUT_TYPES``, the data behind ``/object_info``): widget values are positional in input
order, and INT widgets with ``control_after_generate`` (or named seed / noise_seed) carry one extra entry.
"""
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote")


class WorkflowError(ValueError):
    pass


def _is_widget(spec):
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or str(kind) in WIDGET_TYPES


def _has_control_widget(name, spec):
    options = spec[1] if len(spec) > 1 else {}
    return bool(options.get("control_after_generate", name in ("seed", "noise_seed") and str(spec[0]) == "INT"))


def _default(spec):
    options = spec[1] if len(spec) > 1 else {}
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], (list, tuple)) and spec[0]:
        return spec[0][0]
    return options.get("options", [None])[0]


def ui_to_api(workflow, node_definitions):
    """``node_definitions`` maps a node type to its ``INPUT_TYPES()`` dict."""
    if "nodes" not in workflow:
        raise WorkflowError("not a UI workflow (no 'nodes'); API-format prompts need no conversion")
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_NODES:
            continue
        if node.get("mode", 0) in (2, 4):
            raise WorkflowError(f"node {node['id']} ({kind}) is muted or bypassed; the converter does not rewire those")
        if kind not in node_definitions:
            raise WorkflowError(f"node {node['id']} has unknown type {kind!r}: is its node pack installed?")
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            values = list(values.values())
        position, inputs = 0, {}
        for section in ("required", "optional"):
            for name, spec in node_definitions[kind].get(section, {}).items():
                if _is_widget(spec):
                    value = values[position] if position < len(values) else _default(spec)
                    position += 1 + _has_control_widget(name, spec)
                    inputs[name] = {"__value__": value} if isinstance(value, list) else value
                if name in linked:
                    link = links[linked[name]]
                    inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", kind)}}
    return prompt
