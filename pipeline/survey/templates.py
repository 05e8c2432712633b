"""The survey's pages: server-rendered HTML (Jinja2, autoescaped), one small stylesheet, and one script
(`/timer.js`) that measures each answer's response time in the participant's browser."""

from __future__ import annotations

import jinja2

BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; background: #f4f5f7;
         color: #1d2330; line-height: 1.5; }
  main { max-width: 760px; margin: 2rem auto; background: #fff; padding: 1.5rem 2rem 2rem; border-radius: 10px;
         box-shadow: 0 1px 4px rgba(0,0,0,.08); }
  h1 { font-size: 1.45rem; margin: .2rem 0 1rem; }
  .pair { display: flex; gap: 2rem; justify-content: center; flex-wrap: wrap; margin: 1.2rem 0; }
  figure { margin: 0; text-align: center; }
  figcaption { font-weight: 600; margin-top: .4rem; }
  img.stim { image-rendering: crisp-edges; image-rendering: pixelated; border: 1px solid #c9ced6; max-width: 100%;
             height: auto;
             background: #fff; display: block; margin: 0 auto; }
  .question { text-align: center; }
  .question p.ask { font-size: 1.15rem; font-weight: 600; margin: 1rem 0 .6rem; }
  .answers { display: flex; gap: 1rem; justify-content: center; }
  button, a.button { font: inherit; font-size: 1.05rem; padding: .65rem 1.6rem; border-radius: 7px; cursor: pointer;
           border: 1px solid #3057d5; background: #3057d5; color: #fff; text-decoration: none; display: inline-block; }
  button.alt { background: #fff; color: #3057d5; }
  button:hover, a.button:hover { filter: brightness(1.08); }
  .progress { display: flex; align-items: center; gap: .8rem; font-size: .95rem; color: #4a5263; }
  .bar { flex: 1; height: 10px; background: #e3e6ec; border-radius: 5px; overflow: hidden; }
  .bar span { display: block; height: 100%; background: #3057d5; }
  .code { font: 600 1.6rem ui-monospace, monospace; letter-spacing: .12em; background: #eef1f8; padding: .5rem 1rem;
          border-radius: 6px; display: inline-block; user-select: all; }
  .error { border-left: 4px solid #c23a3a; padding-left: 1rem; }
  .muted { color: #5b6375; font-size: .92rem; }
  .nav { margin-top: 1.5rem; text-align: right; }
</style>
</head>
<body><main>
{% block body %}{% endblock %}
</main></body>
</html>
"""

WELCOME = """{% extends "base.html" %}{% block body %}
<h1>{{ title }}</h1>
{% if participant %}
<p>Welcome back. Your answers so far are saved; continue where you left off.</p>
<p class="nav"><a class="button" href="{{ resume }}">Continue</a></p>
{% else %}
<p>Images can be changed by adding small, deliberate changes to their pixels (a <em>perturbation</em>). Some
perturbations are easy to see, others are almost invisible.</p>
<p>You will see {{ n_questions }} images, one at a time. For each one, decide whether it has been
<strong>perturbed</strong> or is <strong>unperturbed</strong> (the original image). There is no time limit;
go with your impression if you are unsure. Before you start, two examples show what perturbed images look like.</p>
<p class="muted">Your answers are stored anonymously together with the participant id your recruiting platform
passed, if any. Answers are final once given. If the page is closed, opening it again in the same browser
continues where you left off.</p>
<form method="post" action="{{ root }}/start">
  {% if external_id %}<input type="hidden" name="external_id" value="{{ external_id }}">{% endif %}
  <p class="nav"><button type="submit">Start</button></p>
</form>
{% endif %}
{% endblock %}"""

EXAMPLE = """{% extends "base.html" %}{% block body %}
<div class="progress"><span>Example {{ n }} of 2</span></div>
<h1>{{ heading }}</h1>
<p>{{ text }}</p>
<div class="pair">
  <figure><img class="stim" src="{{ root }}/example-image/{{ n }}/clean" width="{{ width }}" height="{{ width }}"
       alt="image A, unperturbed"><figcaption>Image A: unperturbed</figcaption></figure>
  <figure><img class="stim" src="{{ root }}/example-image/{{ n }}/perturbed" width="{{ width }}" height="{{ width }}"
       alt="image B, perturbed"><figcaption>Image B: perturbed ({{ strength }})</figcaption></figure>
</div>
<p class="nav">{% if n == 1 %}<a class="button" href="{{ root }}/example/2">Next example</a>
{% else %}<a class="button" href="{{ root }}/question">Begin the survey</a>{% endif %}</p>
{% endblock %}"""

QUESTION = """{% extends "base.html" %}{% block body %}
<div class="progress"><span>Question {{ position }} of {{ total }}</span>
  <div class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="{{ total }}" aria-valuenow="{{ answered }}">
    <span style="width: {{ percent }}%"></span></div></div>
<div class="question">
  <p class="ask">Has this image been perturbed?</p>
  <img class="stim" id="stim" src="{{ root }}/image/{{ position }}" width="{{ width }}" height="{{ width }}"
       alt="image {{ position }}">
  <form method="post" action="{{ root }}/answer" id="answer-form">
    <input type="hidden" name="item" value="{{ position }}">
    <input type="hidden" name="shown" value="{{ shown }}">
    <input type="hidden" name="client_ms" id="client_ms" value="">
    <p class="answers">
      <button type="submit" name="answer" value="unperturbed" class="alt" id="unperturbed">Unperturbed</button>
      <button type="submit" name="answer" value="perturbed" class="alt" id="perturbed">Perturbed</button>
    </p>
  </form>
</div>
<script src="{{ root }}/timer.js"></script>
{% endblock %}"""

# Response time where the participant is: from the image being on screen (its load event, or now if it is
# already loaded) to the click, in the browser's monotonic clock; the server's own figure is kept beside it.
TIMER_JS = """(function () {
  var img = document.getElementById("stim"), field = document.getElementById("client_ms");
  var form = document.getElementById("answer-form"), shown = null;
  function mark() { if (shown === null) { shown = performance.now(); } }
  if (img.complete && img.naturalWidth > 0) { mark(); } else { img.addEventListener("load", mark); }
  form.addEventListener("submit", function () {
    if (shown !== null) { field.value = String(Math.round(performance.now() - shown)); }
  });
})();
"""

DONE = """{% extends "base.html" %}{% block body %}
<div class="progress"><span>{{ total }} of {{ total }} answered</span>
  <div class="bar"><span style="width: 100%"></span></div></div>
<h1>Thank you!</h1>
<p>All your answers are saved. Your completion code is:</p>
<p><span class="code" id="completion-code">{{ code }}</span></p>
<p class="muted">Copy it into your recruiting platform to confirm that you finished the survey.</p>
{% endblock %}"""

ERROR = """{% extends "base.html" %}{% block body %}
<div class="error"><h1>{{ heading }}</h1><p id="message">{{ message }}</p></div>
{% if link %}<p class="nav"><a class="button" href="{{ link }}">{{ link_text }}</a></p>{% endif %}
{% endblock %}"""

ENV = jinja2.Environment(
    loader=jinja2.DictLoader({"base.html": BASE, "welcome.html": WELCOME, "example.html": EXAMPLE,
                              "question.html": QUESTION, "done.html": DONE, "error.html": ERROR}),
    autoescape=True, undefined=jinja2.StrictUndefined)


def render(name: str, **context) -> str:
    return ENV.get_template(name).render(**context)
