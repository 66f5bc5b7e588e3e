"""Offline English training corpus for the quickstart demo model.

The corpus is assembled from text that exists on any machine with Python:

* a short built-in text about edge devices and the edge agent (weighted up),
* a few built-in chat exchanges in the Phi-3 chat format ending in ``<|end|>``,
* docstrings of a fixed list of Python standard-library modules,
* the license texts in ``/usr/share/common-licenses`` when that folder exists.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

EDGE_TEXT = """\
The edge agent is a small program that runs on a Raspberry Pi and other small computers.
The edge agent runs small language models on the device, without a connection to the cloud.
The edge agent reads the sensors, watches the logs and answers questions about the device.
The edge agent starts when the device boots and keeps running in the background.
The edge agent uses a small model, so it is fast and it does not need much memory.
A small language model can answer short questions and write short summaries.
An edge device is a computer that sits close to the place where the data is made.
Edge devices are small, cheap and quiet, and they use very little power.
The device has a small processor, a little memory and a card for storage.
The model is stored in a folder with a config file, the model file and the tokenizer.
The tokenizer splits the text into tokens, and the model predicts the next token.
The agent reads the prompt, runs the model and returns the answer to the user.
When the temperature of the device is too high, the agent writes a warning to the log.
The agent can restart a service, check the disk and report the state of the network.
The user can talk to the agent from the command line or from a small web page.
The edge agent is simple, it is small, and it works when the network is down.
"""

CHAT_PAIRS: tuple[tuple[str, str], ...] = (
    ("What is the edge agent?", "The edge agent is a small program that runs language models on the device."),
    ("Where does the model run?", "The model runs on the device, without a connection to the cloud."),
    (
        "Is the device hot?",
        "The temperature of the device is normal. I will write a warning if it is too high.",
    ),
    ("Check the disk.", "The disk is fine. There is enough free space on the card."),
    ("Restart the sensor service.", "I restarted the sensor service. It is running again."),
    ("What can you do?", "I can read the sensors, watch the logs and answer short questions."),
    ("Hello!", "Hello! I am the edge agent. How can I help you?"),
    ("Is the network up?", "The network is up. The device can reach the gateway."),
    ("Summarize the logs.", "The logs show that the service started, ran and stopped without errors."),
    ("Thank you.", "You are welcome."),
)

STDLIB_MODULES: tuple[str, ...] = (
    "os", "sys", "json", "re", "collections", "itertools", "functools", "pathlib",
    "subprocess", "threading", "asyncio", "logging", "argparse", "socket", "http.client",
    "urllib.request", "email", "csv", "sqlite3", "datetime", "time", "random", "statistics",
    "math", "decimal", "fractions", "string", "textwrap", "shutil", "tempfile", "glob", "io",
    "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "uuid", "typing",
    "dataclasses", "enum", "abc", "contextlib", "copy", "pickle", "shelve", "queue", "heapq",
    "bisect", "array", "struct", "codecs", "unicodedata", "locale", "gettext", "calendar",
    "pprint", "traceback", "inspect", "dis", "ast", "tokenize", "unittest", "doctest", "pdb",
    "profile", "timeit", "signal", "select", "selectors", "ssl", "smtplib", "ftplib",
    "poplib", "imaplib", "xml.etree.ElementTree", "html", "html.parser", "configparser",
    "tomllib", "base64", "binascii", "platform", "sysconfig", "importlib", "weakref", "gc",
    "operator", "numbers", "cmath", "wave", "colorsys", "mimetypes", "difflib", "filecmp",
    "fnmatch", "linecache", "stat", "getpass", "venv", "zipapp", "concurrent.futures",
    "multiprocessing", "sched", "ipaddress", "http.server", "xmlrpc.client", "webbrowser",
)  # fmt: skip

LICENSE_DIR = Path("/usr/share/common-licenses")
EDGE_REPEAT = 40
CHAT_REPEAT = 20


def chat_text(user: str, assistant: str) -> str:
    """Format one exchange with the Phi-3 style chat template used by the demo."""
    return f"<|user|>\n{user}<|end|>\n<|assistant|>\n{assistant}<|end|>\n"


def stdlib_docstrings() -> list[str]:
    """Return the unique docstrings of the modules in :data:`STDLIB_MODULES`."""
    docs: list[str] = []
    seen: set[str] = set()
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module] + [v for k, v in sorted(vars(module).items()) if not k.startswith("_")]
        for obj in objects:
            if obj is not module and getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def license_texts() -> list[str]:
    """Return the texts in ``/usr/share/common-licenses`` (empty if absent)."""
    if not LICENSE_DIR.is_dir():
        return []
    texts = []
    for path in sorted(LICENSE_DIR.iterdir()):
        if path.is_file() and not path.is_symlink():
            texts.append(path.read_text(encoding="utf-8", errors="ignore"))
    return texts


def _clean(text: str) -> str:
    """Collapse runs of spaces and blank lines."""
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def documents() -> list[str]:
    """Return the full list of training documents (deterministic order)."""
    docs = [_clean(d) for d in stdlib_docstrings() + license_texts()]
    docs += [EDGE_TEXT] * EDGE_REPEAT
    docs += [chat_text(u, a) for u, a in CHAT_PAIRS] * CHAT_REPEAT
    return [d for d in docs if d]
