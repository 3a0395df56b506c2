"""Run one API-format prompt on a ComfyUI server over its websocket and report the frame previews it sends.

    <harness venv>/bin/python tests/helpers/comfy_previews.py PROMPT.api.json --url http://127.0.0.1:8190

Runs in the ComfyUI harness's environment (aiohttp and Pillow come with ComfyUI), not in the test suite's:
`tests/test_comfy_e2e.py` starts it. Prints one JSON object: "status" ("success", or "error" with the
server's message), and "previews", one per preview image the server sent this client while the prompt ran
(what the frontend draws on a node while it works): the node that was executing, "format" and "size"
(width, height) of the decoded image. A client that does not announce ComfyUI's "supports_preview_metadata"
feature, as this one, gets each preview as a binary message: a 4-byte big-endian event type 1, a 4-byte image
type (1 JPEG, 2 PNG), then the image file.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import struct
import sys
import uuid

import aiohttp
from PIL import Image

PREVIEW_IMAGE = 1  # ComfyUI's protocol.BinaryEventTypes.PREVIEW_IMAGE
IMAGE_TYPES = {1: "JPEG", 2: "PNG"}


async def run_prompt(url: str, prompt: dict, timeout: float) -> dict:
    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws?clientId={client_id}", max_msg_size=0) as ws:
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as reply:
                body = await reply.json()
                if reply.status != 200:
                    return {"status": "error", "message": json.dumps(body), "previews": []}
            return await asyncio.wait_for(follow(ws, body["prompt_id"]), timeout)


async def follow(ws, prompt_id: str) -> dict:
    """The server's messages to this client until prompt `prompt_id` ends: the result `main` prints."""
    previews, executing = [], None
    async for message in ws:
        if message.type == aiohttp.WSMsgType.BINARY:
            (event,) = struct.unpack(">I", message.data[:4])
            if event == PREVIEW_IMAGE:
                (kind,) = struct.unpack(">I", message.data[4:8])
                image = Image.open(io.BytesIO(message.data[8:]))
                previews.append({"node": executing, "format": IMAGE_TYPES.get(kind, str(kind)),
                                 "decoded": image.format, "size": list(image.size)})
            continue
        if message.type != aiohttp.WSMsgType.TEXT:
            return {"status": "error", "message": f"websocket closed ({message.type})", "previews": previews}
        event = json.loads(message.data)
        data = event.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        if event["type"] == "execution_error":
            return {"status": "error", "message": data.get("exception_message", ""), "previews": previews}
        if event["type"] == "executing":
            executing = data.get("node")
            if executing is None:
                return {"status": "success", "previews": previews}
    return {"status": "error", "message": "the websocket ended before the prompt", "previews": previews}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="an API-format prompt (JSON file)")
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the prompt may take")
    args = parser.parse_args()
    with open(args.prompt, encoding="utf-8") as handle:
        prompt = json.load(handle)
    result = asyncio.run(run_prompt(args.url.rstrip("/"), prompt, args.timeout))
    json.dump(result, sys.stdout)
    return 0 if result["status"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
