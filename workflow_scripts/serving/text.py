"""From token ids to the text a client sees: incremental decoding, stop strings, the chat template."""

from workflow_scripts.core.errors import InputError

INCOMPLETE_CHARACTER = "\ufffd"  # what decoding gives for the first bytes of a character split across tokens


class TextStream:
    """The text of a growing list of tokens, handed out in pieces that are final: a piece never ends inside a
    character split across tokens, nor with the start of a stop string, which is cut off with everything after
    it."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = tuple(text for text in stop if text)
        self.ids = []
        self.sent = 0
        self.stopped = False

    def add(self, token):
        """The new final text after ``token``; :attr:`stopped` tells whether a stop string ended it."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self.first_stop(text)
        if cut is not None:
            self.stopped = True
            return self.take(text[:cut])
        if text.endswith(INCOMPLETE_CHARACTER):
            return ""
        return self.take(text[: len(text) - self.partial_stop(text)])

    def flush(self):
        """What is left when generation ends without a stop string."""
        return "" if self.stopped else self.take(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def take(self, text):
        piece = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return piece

    def first_stop(self, text):
        # a stop string may have begun in text already sent, but not before it
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        found = [index for index in (text.find(s, start) for s in self.stop) if index >= 0]
        return min(found) if found else None

    def partial_stop(self, text):
        """Length of the longest end of ``text`` that a stop string begins with."""
        return max(
            (n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])),
            default=0,
        )


def message_text(message, index):
    """A chat message's content as text (a string, or a list of text parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text" for part in content):
        return "".join(str(part.get("text", "")) for part in content)
    raise InputError(f"messages[{index}].content: give a string or a list of text parts (no images or audio)")


class ChatTemplate:
    """The model's own chat template, from its ``tokenizer_config.json``, applied by transformers."""

    def __init__(self, folder):
        # the fast tokenizer class itself: AutoTokenizer would read config.json, and an int8 folder's model type
        # would have transformers ask whether to run its code
        from transformers import PreTrainedTokenizerFast

        self.folder = folder
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)

    @property
    def present(self):
        return bool(self.tokenizer.chat_template)

    def render(self, messages):
        if not self.present:
            raise InputError(
                f"this model has no chat template ({self.folder}/tokenizer_config.json has none): use /v1/completions"
            )
        conversation = [
            {"role": message["role"], "content": message_text(message, index)} for index, message in enumerate(messages)
        ]
        try:
            return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # the template's own checks (roles must alternate, ...) raise plain errors
            raise InputError(f"messages: the model's chat template refused them: {error}") from error
