"""The one template of a run: how a (prompt, response) pair becomes the text the reward model reads.

- `tutorial` (default): the tutorial's format string, mindrlhf.data.prompt.PROMPT_TEMPLATE.
- `chat`: the tokenizer folder's own Jinja chat template, rendered with a user turn and an assistant turn as
  transformers' apply_chat_template does (same Jinja environment and special-token variables); the rendered
  text already holds its special tokens, so it is tokenized without adding more.
- a file: `*.jinja` is a chat template, anything else a format string with {instruction} and {response}.

Conversion records the template in the MindRecord sidecar (`<dst>.stats.json`), training copies it next to the
checkpoints (`<checkpoint root>/template.json`), and evaluation and inference render with that record, so the
three can never disagree; asking for a different one is an error.
"""
import datetime
import functools
import hashlib
import json
import os
import string
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from mindrlhf.data.prompt import PROMPT_TEMPLATE
from mindrlhf.errors import ConfigError

TEMPLATE_NAMES = ("tutorial", "chat")
FORMAT, JINJA = "format", "jinja"
RUN_TEMPLATE_FILE = "template.json"


@dataclass
class Template:
    """name: what the user asked for; kind: format or jinja; source: the template text; variables: the special
    tokens a Jinja template sees; date: what strftime_now() returns (fixed when the template is made, so a
    date-stamped system prompt renders the same in training and evaluation)."""

    name: str
    kind: str
    source: str
    variables: Dict[str, object] = field(default_factory=dict)
    date: str = ""

    @property
    def special_tokens(self) -> bool:
        """Whether the tokenizer adds its own BOS/EOS: yes for plain text, no for a rendered chat template."""
        return self.kind == FORMAT

    def render(self, prompt: str, response: str) -> str:
        """Inputs are stripped, as the tutorial does."""
        prompt, response = prompt.strip(), response.strip()
        if self.kind == FORMAT:
            return self.source.format_map({"instruction": prompt, "response": response})
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        compiled = _compile(self.source, self.date)
        return compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=False,
                               **self.variables)

    def render_messages(self, messages: Sequence[dict], where: str = "a conversation") -> str:
        """A whole conversation (every turn) as the chat template renders it; a format template has no turns."""
        if self.kind == FORMAT:
            raise ConfigError(f"{where}: conversational rows need a chat template (--template chat or a .jinja "
                              f"file); the template '{self.name}' only renders one prompt and one response")
        messages = [dict(m, content=m["content"].strip()) for m in messages]
        return _compile(self.source, self.date).render(messages=messages, tools=None, documents=None,
                                                       add_generation_prompt=False, **self.variables)

    def encode(self, tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> List[List[int]]:
        """Token ids of the rendered pairs, batched."""
        return tokenizer.encode([self.render(p, r) for p, r in zip(prompts, responses)],
                                special_tokens=self.special_tokens)

    def fingerprint(self) -> str:
        """What decides the rendered text (not the name): kind, source, variables, date."""
        data = json.dumps([self.kind, self.source, self.variables, self.date], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]

    def record(self) -> dict:
        return dict(asdict(self), fingerprint=self.fingerprint())

    @classmethod
    def from_record(cls, record: dict, where: str = "record") -> "Template":
        try:
            template = cls(record["name"], record["kind"], record["source"], dict(record.get("variables") or {}),
                           record.get("date", ""))
        except (KeyError, TypeError):
            raise ConfigError(f"{where}: not a template record (needs name, kind, source)") from None
        if template.kind not in (FORMAT, JINJA):
            raise ConfigError(f"{where}: unknown template kind {template.kind!r}")
        return template

    def same_as(self, other: "Template") -> bool:
        return self.fingerprint() == other.fingerprint()


TUTORIAL = Template("tutorial", FORMAT, PROMPT_TEMPLATE)


class _Generation:  # pylint: disable=too-few-public-methods
    """transformers' {% generation %} tag renders its body unchanged (it only tracks assistant spans)."""


@functools.lru_cache(maxsize=8)
def _compile(source: str, date: str):
    """The template compiled as transformers' _compile_jinja_template does: sandboxed, trim_blocks and
    lstrip_blocks, loop controls, its tojson filter, raise_exception and strftime_now."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):  # pylint: disable=no-self-use
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.fromisoformat(date or "2024-01-01").strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ConfigError(f"chat template: Jinja syntax error at line {err.lineno}: {err.message}") from None


def _jinja_template(name: str, source: str, tokenizer) -> Template:
    if not hasattr(tokenizer, "special_tokens"):
        raise ConfigError(f"--template {name}: a chat template needs a Hugging Face tokenizer folder "
                          "(tokenizer.json): SentencePiece cannot read special tokens written in the text")
    date = datetime.date.today().isoformat() if "strftime_now" in source else ""  # only date-stamped ones
    template = Template(name, JINJA, source, dict(tokenizer.special_tokens), date)
    _compile(template.source, template.date)  # syntax errors now, not mid-conversion
    return template


def _format_template(path: str) -> Template:
    with open(path, encoding="utf-8") as fh:
        source = fh.read()
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(source) if f is not None}
    except ValueError as err:
        raise ConfigError(f"{path}: not a format template ({err}); write {{instruction}} and {{response}}, "
                          "and double other braces") from None
    if fields != {"instruction", "response"}:
        raise ConfigError(f"{path}: a template file needs exactly the fields {{instruction}} and {{response}}, "
                          f"found {sorted(fields) or 'none'} (a .jinja file is read as a chat template)")
    return Template(os.path.abspath(path), FORMAT, source)


def resolve_template(spec: Optional[str], tokenizer=None) -> Template:
    """--template: tutorial (default), chat (needs a Hugging Face tokenizer folder with a chat template), or a
    file path."""
    if spec in (None, "", "tutorial"):
        return TUTORIAL
    if spec == "chat":
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            where = getattr(tokenizer, "folder", None) or getattr(tokenizer, "path", None) or "(no tokenizer)"
            raise ConfigError(f"--template chat: the tokenizer {where} has no chat template (looked for "
                              "chat_template.jinja and tokenizer_config.json's chat_template); pass --template "
                              "tutorial or a template file")
        return _jinja_template("chat", source, tokenizer)
    if not os.path.isfile(spec):
        raise ConfigError(f"--template {spec!r} is not one of {', '.join(TEMPLATE_NAMES)} or an existing file")
    if spec.endswith(".jinja"):
        with open(spec, encoding="utf-8") as fh:
            return _jinja_template(os.path.abspath(spec), fh.read(), tokenizer)
    return _format_template(spec)


def sidecar_template(mindrecord: str) -> Optional[Template]:
    """The template a MindRecord was converted with, from its sidecar; files converted before templates were
    recorded used the tutorial's (the only one then); None when there is no sidecar."""
    sidecar = str(mindrecord) + ".stats.json"
    if not os.path.isfile(sidecar):
        return None
    with open(sidecar, encoding="utf-8") as fh:
        record = json.load(fh).get("template")
    return Template.from_record(record, sidecar) if record else TUTORIAL


def data_template(files: Sequence[str]) -> Optional[Template]:
    """The one template of a set of MindRecord files; files converted with different templates are an error."""
    found = {}
    for path in files:
        template = sidecar_template(path)
        if template is not None:
            found.setdefault(template.fingerprint(), (template, path))
    if len(found) > 1:
        shown = "; ".join(f"{path}: {t.name}" for t, path in found.values())
        raise ConfigError(f"the dataset files were converted with different templates ({shown}); convert them "
                          "with one --template")
    return next(iter(found.values()))[0] if found else None


def run_template_path(checkpoint_root: str) -> str:
    return os.path.join(checkpoint_root, RUN_TEMPLATE_FILE)


def read_run_template(checkpoint_root: Optional[str]) -> Optional[Template]:
    path = run_template_path(checkpoint_root) if checkpoint_root else None
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return Template.from_record(json.load(fh), path)


def write_run_template(checkpoint_root: str, template: Template):
    from mindrlhf.io import write_json

    os.makedirs(checkpoint_root, exist_ok=True)
    write_json(run_template_path(checkpoint_root), template.record())


def choose_template(requested: Optional[str], tokenizer, recorded: Optional[Template], recorded_where: str,
                    data: Optional[Template] = None, data_where: str = "") -> Template:
    """The template evaluation/inference render with: the run's recorded one; --template only to confirm it.

    A requested template that renders differently from the recorded one, or an eval MindRecord converted with
    another template than the run's, is an error naming both.
    """
    chosen = recorded
    if requested is not None:
        asked = resolve_template(requested, tokenizer)
        if recorded is not None and not asked.same_as(recorded):
            raise ConfigError(f"--template {requested} renders differently from the template the checkpoints were "
                              f"trained with ('{recorded.name}', recorded in {recorded_where}); leave out "
                              "--template to use the recorded one")
        chosen = recorded or asked
    if data is not None:
        if chosen is not None and not data.same_as(chosen):
            raise ConfigError(f"{data_where} was converted with the template '{data.name}' but the checkpoints were "
                              f"trained with '{chosen.name}' ({recorded_where}); convert the eval set with the "
                              "run's template")
        chosen = chosen or data
    return chosen or TUTORIAL


# -- full texts from clients -----------------------------------------------------------------------------------
PROMPT_MARK, RESPONSE_MARK = "MINDRLHFPROMPTMARK", "MINDRLHFRESPONSEMARK"


def _special_text(tokenizer, key: str) -> Optional[str]:
    """The tokenizer's own spelling of its BOS/EOS (key 'bos' or 'eos'), None when it has none."""
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:  # SentencePiece: the piece of bos_id/eos_id ('<s>', '</s>' for Llama 2)
        index = sp.bos_id() if key == "bos" else sp.eos_id()
        return sp.id_to_piece(index) if index >= 0 else None
    content = getattr(tokenizer, "special_tokens", {}).get(f"{key}_token")
    return content if isinstance(content, str) and content else None


@dataclass
class FullTextNormaliser:
    """A full text as an RL loop sends it -> the text the run's template renders for it, before tokenizing.

    RL loops (OpenRLHF, verl) decode the policy's token ids with skip_special_tokens=False, so a query carries
    the BOS and EOS as text; the reward must be read after the same token ids as in training:
    - leading BOS text: the BOS the template renders or the tokenizer adds anyway, so exactly one remains (a
      SentencePiece decode also writes a space after it, which is dropped with it); a template that renders the
      BOS gets it back when the client stripped it (verl does, as vLLM adds one);
    - one trailing EOS text the template never renders (the tutorial's): dropped; only one, since an RL loop
      appends at most one and a response may itself end in text spelled like it (HTML's `</s>`);
    - a chat template's end of turn (`<|im_end|>\\n`, `<|eot_id|>`, Llama 2's ` </s>`) stays as its training rows
      have it: the whitespace it renders around that token, which generation does not produce (the policy stops
      at the token; Llama 2's template puts a space before it), is restored.
    Only this tokenizer's own spelling counts: `<s>` sent to a tokenizer.json model is ordinary text.
    """

    bos: Optional[str]
    eos: Optional[str]
    bos_space: bool  # a SentencePiece decode writes ' ' after the BOS text
    bos_in_template: bool  # the template renders the BOS as text (Llama 3's chat template)
    end_of_turn: str  # what the template renders after the response ('' for the tutorial)

    def __call__(self, text: str) -> str:
        stripped = 0
        if self.bos:
            while text.startswith(self.bos):
                text, stripped = text[len(self.bos):], stripped + 1
            if stripped and self.bos_space and text.startswith(" "):
                text = text[1:]
            if self.bos_in_template:
                text = self.bos + text
        end = self.end_of_turn
        token = end.strip()
        if token:
            if not text.endswith(end) and text.endswith(token):
                text = text[:-len(token)] + end
            return text
        if self.eos and text.endswith(self.eos):
            text = text[:-len(self.eos)]
        if end and not text.endswith(end):  # a template that renders only whitespace after the response
            text += end
        return text

    def describe(self) -> dict:
        """What is normalised, for /health and the logs."""
        rules = []
        if self.bos:
            after = " (and the space a SentencePiece decode writes after it)" if self.bos_space else ""
            becomes = ("one, as the template renders it" if self.bos_in_template
                       else "the BOS the tokenizer adds, if any")
            rules.append(f"leading {self.bos!r}{after} -> {becomes}")
        token = self.end_of_turn.strip()
        if token:
            rules.append(f"the template's end of turn {self.end_of_turn!r} is kept" + (
                f"; a text ending in {token!r} gets it back whole" if token != self.end_of_turn else ""))
        else:
            if self.eos:
                rules.append(f"one trailing {self.eos!r} dropped: the template never trained on it")
            if self.end_of_turn:
                rules.append(f"the whitespace {self.end_of_turn!r} the template renders after the response is "
                             "restored where missing")
        return {"bos": self.bos, "eos": self.eos, "end_of_turn": self.end_of_turn, "rules": rules,
                "why": "RL loops decode the policy's ids with skip_special_tokens=False; the reward is read after the "
                       "token ids the template gives in training. The policy's prompt format must be this template: "
                       "any other format is scored as it is, and the score means nothing."}


    @classmethod
    def build(cls, template: Template, tokenizer) -> "FullTextNormaliser":
        """The normaliser for this template and tokenizer (shared by the server and reward_infer)."""
        rendered = template.render(PROMPT_MARK, RESPONSE_MARK)
        prefix = rendered[:rendered.index(PROMPT_MARK)] if PROMPT_MARK in rendered else rendered
        # a template that changes the response (a filter) has no end of turn we can tell: nothing is appended
        end = rendered[rendered.index(RESPONSE_MARK) + len(RESPONSE_MARK):] if RESPONSE_MARK in rendered else ""
        bos, eos = _special_text(tokenizer, "bos"), _special_text(tokenizer, "eos")
        return cls(bos=bos, eos=eos, bos_space=hasattr(tokenizer, "sp") and not prefix.startswith(" "),
                   bos_in_template=bool(bos) and prefix.startswith(bos), end_of_turn=end)
