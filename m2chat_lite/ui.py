"""Showing conversations with pictures: a self-contained HTML page, and a chat widget for notebooks.

Taught in notebook ``09_interleaved_chat``; ``m2chat-lite demo`` writes its page with :func:`save_html`.

* :func:`conversation_html` / :func:`save_html`: messages (text and PIL pictures, the format of
  ``pipeline.M2ChatPipeline.chat``) as one HTML file with the pictures embedded as PNG data, so it opens
  anywhere, offline, and can be mailed or attached. Written to a temporary file, then renamed.
* :class:`ChatWidget`: an ipywidgets chat (a text box, an image upload, Send and New buttons, the
  conversation with its pictures). :meth:`ChatWidget.send` does what the Send button does, so the widget
  is driven the same way in a notebook, a test or a script with no browser.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Sequence

from .data import load_image
from .plotting import image_data_uri
from .utils import atomic_write_text

PICTURE_SCALE = 4  # 32x32 pictures are stored upscaled 4x with nearest-neighbour pixels, so they stay crisp

# Scoped to .m2chat, so the widget does not restyle the notebook around it; the page adds its body style
_STYLE = """
.m2chat .turn { margin: .6rem 0; padding: .6rem .8rem; border-radius: .5rem; }
.m2chat .user { background: #eef3fb; } .m2chat .assistant { background: #f4f4f4; }
.m2chat .role { font-size: .75rem; text-transform: uppercase; color: #777; }
.m2chat figure { display: inline-block; margin: .3rem .5rem .3rem 0; text-align: center; }
.m2chat figure img { image-rendering: pixelated; border: 1px solid #ccc; }
.m2chat figcaption { font-size: .7rem; color: #777; }
"""
_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
"""


def _segments(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def message_html(message: dict) -> str:
    """One turn: its role, its words (escaped), its pictures (with the adapter's gate, if recorded)."""
    role = message.get("role", "user")
    parts = [f'<div class="turn {html.escape(role)}"><div class="role">{html.escape(role)}</div>']
    for segment in _segments(message.get("content", "")):
        if segment.get("type") == "image":
            if segment.get("image") is None:
                raise ValueError("an image segment has no picture; give {'type': 'image', 'image': <PIL picture>}")
            gate = f'<figcaption>gate {segment["gate"]:.2f}</figcaption>' if "gate" in segment else ""
            uri = image_data_uri(load_image(segment["image"]), PICTURE_SCALE)
            parts.append(f'<figure><img alt="picture" src="{uri}">{gate}</figure>')
        else:
            parts.append(f'<p>{html.escape(segment.get("text", ""))}</p>')
    parts.append("</div>")
    return "".join(parts)


def conversation_html(messages: Sequence[dict]) -> str:
    """The turns of one conversation as an HTML fragment (styled by ``_STYLE``)."""
    return '<div class="m2chat">' + "\n".join(message_html(m) for m in messages) + "</div>"


def page_html(sections: Sequence[tuple[str, Sequence[dict]]], title: str = "M²Chat", note: str = "") -> str:
    """A whole page: a title, an optional note, and one headed section per conversation."""
    body = [f"<h1>{html.escape(title)}</h1>"] + ([f"<p>{html.escape(note)}</p>"] if note else [])
    for heading, messages in sections:
        body += [f"<h2>{html.escape(heading)}</h2>", conversation_html(messages)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_PAGE_STYLE}{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def save_html(sections, path, title: str = "M²Chat", note: str = "") -> Path:
    """Write :func:`page_html` to ``path`` (all or nothing). ``sections`` is a list of ``(heading,
    messages)``, or one conversation's messages."""
    if sections and isinstance(sections[0], dict):
        sections = [("Conversation", sections)]
    path = Path(path)
    atomic_write_text(path, page_html(sections, title, note))
    return path


class ChatWidget:
    """A chat with an :class:`~m2chat_lite.pipeline.M2ChatPipeline` in a notebook.

    Type a message, optionally upload a picture, press Send: the reply appears with its pictures. ``New``
    starts over. ``send(text, image=None)`` does the same from code (and returns the reply), which is how the
    notebook's tests drive it. ``chat_kwargs`` go to ``pipeline.chat`` (e.g. ``do_sample=True``)."""

    def __init__(self, pipeline, **chat_kwargs):
        import ipywidgets as widgets

        self.pipeline, self.chat_kwargs = pipeline, chat_kwargs
        self.messages: list[dict] = []
        self.transcript = widgets.HTML()
        self.status = widgets.HTML()
        self.text = widgets.Text(placeholder="draw a big red circle at the top left.", layout={"width": "60%"})
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="picture")
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.new_button = widgets.Button(description="New")
        self.send_button.on_click(lambda _: self._send_from_widgets())
        self.text.continuous_update = False
        self.new_button.on_click(lambda _: self.reset())
        self.widget = widgets.VBox([self.transcript, widgets.HBox([self.text, self.upload, self.send_button,
                                                                   self.new_button]), self.status])
        self._render()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _render(self) -> None:
        self.transcript.value = f"<style>{_STYLE}</style>" + conversation_html(self.messages) if self.messages \
            else "<i>Say something to start, e.g. “tell me a story about a small red square.”</i>"

    def reset(self) -> None:
        """Start a new conversation."""
        self.messages = []
        self.status.value = ""
        self._render()

    def send(self, text: str = "", image=None):
        """Add the user's turn (words and/or a picture: PIL, path or uploaded bytes), get the reply, show both."""
        from .pipeline import user_message

        if isinstance(image, (bytes, bytearray, memoryview)):
            import PIL.Image

            try:
                image = PIL.Image.open(io.BytesIO(bytes(image)))
                image.load()
            except (OSError, SyntaxError, ValueError) as error:
                raise ValueError(f"the uploaded file is not a picture ({error}); upload a PNG or JPEG") from None
        if image is not None:
            image = load_image(image, size=self.pipeline.image_size)  # checks it, and shows it as the model sees it
        message = user_message(text.strip(), image)
        reply = self.pipeline.chat(self.messages + [message], **self.chat_kwargs)
        self.messages += [message, reply.message]
        self.status.value = f"{reply.tokens} tokens, {len(reply.images)} pictures, {reply.seconds:.1f} s" + \
            ("" if reply.finished else " (stopped at max_new_tokens)")
        self._render()
        return reply

    def _send_from_widgets(self) -> None:
        uploaded = self.upload.value
        image = bytes(uploaded[0]["content"]) if uploaded else None
        try:
            self.send(self.text.value, image)
        except ValueError as error:  # say what is wrong in the widget, keep the conversation
            self.status.value = f'<span style="color:#b00">{html.escape(str(error))}</span>'
            return
        self.text.value = ""
        self.upload.value = ()
