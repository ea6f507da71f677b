"""The API pool of the LongGorilla-style task: real Python standard-library functions, pinned.

Each entry is one public function of a fixed list of standard-library modules: its module, name,
signature and the first line of its docstring, with a domain and a functionality label per module.
The pool is read from a snapshot committed beside this file (``data/stdlib_apis.json``), not
from the running interpreter, so a seed gives the same problems on every machine and every Python
version, whatever optional packages are installed. ``python -m perk.tasks.api_pool`` rebuilds the
snapshot from the running interpreter's standard library (then commit it; problems change).

Kept: functions (Python or builtin) listed in the module's ``__all__`` (else its public names),
with an inspectable signature of at most MAX_SIGNATURE_CHARS, whose docstring's first sentence
starts with an imperative verb of VERBS and is not an alias note ("Same as ...", "Deprecated").
Entries whose description says the same as an earlier one (after its first word) are dropped,
so an instruction derived from a description names exactly one API of the pool.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import platform
import re
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("data") / "stdlib_apis.json"
FRAMEWORK = "Python Standard Library"
MAX_SIGNATURE_CHARS = 100
MIN_DESCRIPTION_CHARS = 20
MAX_DESCRIPTION_CHARS = 160

# module -> (domain, functionality), in the order of the Python Library Reference's chapters.
MODULES: dict[str, tuple[str, str]] = {
    "string": ("Text Processing Services", "Common string operations"),
    "re": ("Text Processing Services", "Regular expression operations"),
    "difflib": ("Text Processing Services", "Helpers for computing deltas"),
    "textwrap": ("Text Processing Services", "Text wrapping and filling"),
    "unicodedata": ("Text Processing Services", "Unicode database"),
    "struct": ("Binary Data Services", "Interpret bytes as packed binary data"),
    "codecs": ("Binary Data Services", "Codec registry and base classes"),
    "datetime": ("Data Types", "Basic date and time types"),
    "calendar": ("Data Types", "General calendar-related functions"),
    "collections": ("Data Types", "Container datatypes"),
    "heapq": ("Data Types", "Heap queue algorithm"),
    "bisect": ("Data Types", "Array bisection algorithm"),
    "weakref": ("Data Types", "Weak references"),
    "types": ("Data Types", "Dynamic type creation and names for built-in types"),
    "copy": ("Data Types", "Shallow and deep copy operations"),
    "pprint": ("Data Types", "Data pretty printer"),
    "enum": ("Data Types", "Support for enumerations"),
    "math": ("Numeric and Mathematical Modules", "Mathematical functions"),
    "cmath": ("Numeric and Mathematical Modules", "Mathematical functions for complex numbers"),
    "random": ("Numeric and Mathematical Modules", "Generate pseudo-random numbers"),
    "statistics": ("Numeric and Mathematical Modules", "Mathematical statistics functions"),
    "itertools": ("Functional Programming Modules", "Functions creating iterators for efficient looping"),
    "functools": ("Functional Programming Modules", "Higher-order functions and operations on callable objects"),
    "operator": ("Functional Programming Modules", "Standard operators as functions"),
    "os.path": ("File and Directory Access", "Common pathname manipulations"),
    "stat": ("File and Directory Access", "Interpreting stat() results"),
    "filecmp": ("File and Directory Access", "File and directory comparisons"),
    "tempfile": ("File and Directory Access", "Generate temporary files and directories"),
    "glob": ("File and Directory Access", "Unix style pathname pattern expansion"),
    "fnmatch": ("File and Directory Access", "Unix filename pattern matching"),
    "linecache": ("File and Directory Access", "Random access to text lines"),
    "shutil": ("File and Directory Access", "High-level file operations"),
    "pickle": ("Data Persistence", "Python object serialization"),
    "copyreg": ("Data Persistence", "Register pickle support functions"),
    "shelve": ("Data Persistence", "Python object persistence"),
    "marshal": ("Data Persistence", "Internal Python object serialization"),
    "sqlite3": ("Data Persistence", "DB-API 2.0 interface for SQLite databases"),
    "zlib": ("Data Compression and Archiving", "Compression compatible with gzip"),
    "gzip": ("Data Compression and Archiving", "Support for gzip files"),
    "bz2": ("Data Compression and Archiving", "Support for bzip2 compression"),
    "lzma": ("Data Compression and Archiving", "Compression using the LZMA algorithm"),
    "zipfile": ("Data Compression and Archiving", "Work with ZIP archives"),
    "tarfile": ("Data Compression and Archiving", "Read and write tar archive files"),
    "csv": ("File Formats", "CSV file reading and writing"),
    "configparser": ("File Formats", "Configuration file parser"),
    "plistlib": ("File Formats", "Generate and parse Apple .plist files"),
    "hashlib": ("Cryptographic Services", "Secure hashes and message digests"),
    "hmac": ("Cryptographic Services", "Keyed-hashing for message authentication"),
    "secrets": ("Cryptographic Services", "Generate secure random numbers for managing secrets"),
    "os": ("Generic Operating System Services", "Miscellaneous operating system interfaces"),
    "time": ("Generic Operating System Services", "Time access and conversions"),
    "getpass": ("Generic Operating System Services", "Portable password input"),
    "platform": ("Generic Operating System Services", "Access to underlying platform's identifying data"),
    "errno": ("Generic Operating System Services", "Standard errno system symbols"),
    "threading": ("Concurrent Execution", "Thread-based parallelism"),
    "subprocess": ("Concurrent Execution", "Subprocess management"),
    "sched": ("Concurrent Execution", "Event scheduler"),
    "socket": ("Networking and Interprocess Communication", "Low-level networking interface"),
    "select": ("Networking and Interprocess Communication", "Waiting for I/O completion"),
    "signal": ("Networking and Interprocess Communication", "Set handlers for asynchronous events"),
    "email.utils": ("Internet Data Handling", "Miscellaneous email utilities"),
    "json": ("Internet Data Handling", "JSON encoder and decoder"),
    "mimetypes": ("Internet Data Handling", "Map filenames to MIME types"),
    "base64": ("Internet Data Handling", "Base16, Base32, Base64, Base85 Data Encodings"),
    "binascii": ("Internet Data Handling", "Convert between binary and ASCII"),
    "quopri": ("Internet Data Handling", "Encode and decode MIME quoted-printable data"),
    "html": ("Structured Markup Processing Tools", "HyperText Markup Language support"),
    "xml.sax.saxutils": ("Structured Markup Processing Tools", "SAX Utilities"),
    "urllib.parse": ("Internet Protocols and Support", "Parse URLs into components"),
    "http.cookiejar": ("Internet Protocols and Support", "Cookie handling for HTTP clients"),
    "uuid": ("Internet Protocols and Support", "UUID objects according to RFC 4122"),
    "ipaddress": ("Internet Protocols and Support", "IPv4/IPv6 manipulation library"),
    "wave": ("Multimedia Services", "Read and write WAV files"),
    "colorsys": ("Multimedia Services", "Conversions between color systems"),
    "gettext": ("Internationalization", "Multilingual internationalization services"),
    "locale": ("Internationalization", "Internationalization services"),
    "shlex": ("Program Frameworks", "Simple lexical analysis"),
    "doctest": ("Development Tools", "Test interactive Python examples"),
    "unittest.mock": ("Development Tools", "Mock object library"),
    "timeit": ("Debugging and Profiling", "Measure execution time of small code snippets"),
    "trace": ("Debugging and Profiling", "Trace or track Python statement execution"),
    "tracemalloc": ("Debugging and Profiling", "Trace memory allocations"),
    "sys": ("Python Runtime Services", "System-specific parameters and functions"),
    "sysconfig": ("Python Runtime Services", "Provide access to Python's configuration information"),
    "warnings": ("Python Runtime Services", "Warning control"),
    "dataclasses": ("Python Runtime Services", "Data Classes"),
    "contextlib": ("Python Runtime Services", "Utilities for with-statement contexts"),
    "traceback": ("Python Runtime Services", "Print or retrieve a stack traceback"),
    "gc": ("Python Runtime Services", "Garbage Collector interface"),
    "inspect": ("Python Runtime Services", "Inspect live objects"),
    "site": ("Python Runtime Services", "Site-specific configuration hook"),
    "codeop": ("Custom Python Interpreters", "Compile Python code"),
    "pkgutil": ("Importing Modules", "Package extension utility"),
    "runpy": ("Importing Modules", "Locating and executing Python modules"),
    "importlib": ("Importing Modules", "The implementation of import"),
    "ast": ("Python Language Services", "Abstract Syntax Trees"),
    "symtable": ("Python Language Services", "Access to the compiler's symbol tables"),
    "keyword": ("Python Language Services", "Testing for Python keywords"),
    "tokenize": ("Python Language Services", "Tokenizer for Python source"),
    "py_compile": ("Python Language Services", "Compile Python source files"),
    "compileall": ("Python Language Services", "Byte-compile Python libraries"),
    "dis": ("Python Language Services", "Disassembler for Python bytecode"),
    "fileinput": ("File and Directory Access", "Iterate over lines from multiple input streams"),
}

# Imperative first words of a description, and the third-person form an instruction uses
# ("Return the ..." -> "Write an API implementation that returns the ..."). A description that
# already starts in the third person keeps its verb.
VERBS: dict[str, str] = {
    "Add": "adds", "Adds": "adds", "Apply": "applies", "Build": "builds", "Calculate": "calculates",
    "Call": "calls", "Change": "changes", "Check": "checks", "Checks": "checks", "Clear": "clears",
    "Close": "closes", "Collapse": "collapses", "Compare": "compares", "Compile": "compiles",
    "Compress": "compresses", "Compute": "computes", "Construct": "constructs", "Convert": "converts",
    "Copy": "copies", "Count": "counts", "Create": "creates", "Decode": "decodes",
    "Decompress": "decompresses", "Delete": "deletes", "Determine": "determines",
    "Disassemble": "disassembles", "Dump": "dumps", "Encode": "encodes", "Escape": "escapes",
    "Execute": "executes", "Expand": "expands", "Extract": "extracts", "Fill": "fills",
    "Find": "finds", "Format": "formats", "Generate": "generates", "Get": "gets", "Guess": "guesses",
    "Insert": "inserts", "Join": "joins", "Load": "loads", "Make": "makes", "Move": "moves",
    "Normalize": "normalizes", "Open": "opens", "Pack": "packs", "Parse": "parses", "Perform": "performs",
    "Pop": "pops", "Print": "prints", "Push": "pushes", "Quote": "quotes", "Read": "reads",
    "Register": "registers", "Registers": "registers", "Remove": "removes", "Removes": "removes",
    "Rename": "renames", "Replace": "replaces", "Resolve": "resolves", "Return": "returns",
    "Returns": "returns", "Run": "runs", "Search": "searches", "Send": "sends", "Set": "sets",
    "Sets": "sets", "Split": "splits", "Test": "tests", "Transform": "transforms",
    "Translate": "translates", "Unpack": "unpacks", "Wait": "waits", "Wrap": "wraps", "Write": "writes",
    "Yield": "yields",
}
_ALIAS_NOTE = re.compile(r"\b(?:same as|deprecated|alias|equivalent to)\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Api:
    """One function of the pool."""

    module: str
    name: str
    signature: str  # "(text, width=70, **kwargs)"
    call: str  # the answer: the call with its required arguments, "textwrap.fill(text)"
    description: str  # the docstring's first sentence, starting with a verb of VERBS

    @property
    def api_name(self) -> str:
        return f"{self.module}.{self.name}"

    def document(self) -> str:
        """The API's document in the official LongGorilla layout."""
        domain, functionality = MODULES[self.module]
        top = self.module.split(".")[0]
        return (
            f"<api>{self.call}</api> domain: {domain}, framework: {FRAMEWORK}, functionality: {functionality}, "
            f"api_name: {self.api_name}, api_arguments: {self.signature}, python_environment_requirements: "
            f"[{top}], example_code: import {self.module}; result = {self.call}, performance: dataset: N/A, "
            f"accuracy: N/A, description: {self.description}"
        )

    def instruction(self) -> str:
        """The question: the description as a request ("... that returns the ...")."""
        verb, rest = self.description.split(" ", 1)
        return f"Instruction: Write an API implementation that {VERBS[verb]} {rest}"


def required_call(module: str, name: str, signature: inspect.Signature) -> str:
    """``module.name(a, *args, key=key)``: the call with the parameters that have no default."""
    arguments = []
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            arguments.append(f"*{parameter.name}")
        elif parameter.default is parameter.empty and parameter.kind is not parameter.VAR_KEYWORD:
            keyword = parameter.kind is parameter.KEYWORD_ONLY
            arguments.append(f"{parameter.name}={parameter.name}" if keyword else parameter.name)
    return f"{module}.{name}({', '.join(arguments)})"


def _description(obj: object) -> str | None:
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    paragraph = " ".join(doc.split("\n\n")[0].split())
    sentence = re.split(r"(?<=\.)\s", paragraph)[0]
    words = sentence.split(" ", 1)
    if len(words) < 2 or words[0] not in VERBS or _ALIAS_NOTE.search(sentence):
        return None
    if not MIN_DESCRIPTION_CHARS <= len(sentence) <= MAX_DESCRIPTION_CHARS:
        return None
    return sentence


def build_api_pool() -> list[Api]:
    """The pool from the running interpreter's standard library (to rebuild the snapshot)."""
    apis: list[Api] = []
    seen_objects: set[int] = set()
    seen_descriptions: set[str] = set()
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a module this platform lacks
            continue
        names = getattr(module, "__all__", None) or dir(module)
        for name in sorted(set(names)):
            obj = getattr(module, name, None)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            try:
                signature = inspect.signature(obj)
            except (TypeError, ValueError):
                continue
            description = _description(obj)
            if description is None or len(str(signature)) > MAX_SIGNATURE_CHARS or id(obj) in seen_objects:
                continue
            key = " ".join(description.split(" ", 1)[1].lower().split())
            if key in seen_descriptions:
                continue
            seen_objects.add(id(obj))
            seen_descriptions.add(key)
            apis.append(Api(module_name, name, str(signature), required_call(module_name, name, signature), description))
    return sorted(apis, key=lambda api: (api.module, api.name))


@functools.lru_cache(maxsize=1)
def api_pool() -> tuple[Api, ...]:
    """The pinned pool, read from the committed snapshot, sorted by (module, name)."""
    data = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    return tuple(Api(**entry) for entry in data["apis"])


def write_snapshot(path: Path = SNAPSHOT) -> int:
    """Write the pool of the running interpreter to ``path``; returns the number of APIs."""
    apis = build_api_pool()
    source = json.dumps(f"Python {platform.python_version()} standard library ({sys.platform})")
    # One API per line, so a rebuilt snapshot reads as a diff of APIs.
    lines = ",\n".join(json.dumps(dataclasses.asdict(api), ensure_ascii=False) for api in apis)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{{"source": {source}, "apis": [\n{lines}\n]}}\n', encoding="utf-8")
    return len(apis)


if __name__ == "__main__":
    print(f"wrote {write_snapshot()} APIs to {SNAPSHOT}")
