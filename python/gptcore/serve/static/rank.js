// /rank: take a prompt from GET /rank/next, sample K answers with one completion request (n=K),
// let the person order them, and POST the order to /rank/submit. Answers keep the letter of the
// order they were sampled in (A, B, ...), so a person can follow one while moving it.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const list = $("answers"), status = $("rank-status"), errorBox = $("rank-error");
  const submit = $("rank-submit");
  let current = null;   // {prompt, k, ...} from /rank/next
  let settings = null;  // the sampling settings the shown answers were drawn with
  let busy = false;

  function setStatus(text, state) {
    status.textContent = text;
    status.dataset.state = state;
  }

  function setBusy(on) {
    busy = on;
    for (const b of [submit, $("resample"), $("skip")]) b.disabled = on;
    if (!on) submit.disabled = list.children.length < 2;
  }

  // Renumber the ranks and enable the arrows that can move (first cannot go up, last not down).
  function renumber() {
    const items = [...list.children];
    items.forEach((li, i) => {
      li.querySelector(".rankno").firstChild.textContent = String(i + 1);
      li.querySelector(".move-up").disabled = i === 0;
      li.querySelector(".move-down").disabled = i === items.length - 1;
      li.setAttribute("aria-label", "Rank " + (i + 1) + ": answer " + li.dataset.letter);
    });
  }

  function move(li, delta, keepFocus) {
    const items = [...list.children], i = items.indexOf(li), j = i + delta;
    if (j < 0 || j >= items.length) return;
    if (delta < 0) list.insertBefore(li, items[j]); else list.insertBefore(items[j], li);
    renumber();
    li.classList.remove("moved");
    void li.offsetWidth;  // restart the highlight animation
    li.classList.add("moved");
    if (keepFocus) keepFocus.focus();
    setStatus("answer " + li.dataset.letter + " is now rank " + (j + 1), "ready");
  }

  function card(text, letter) {
    const li = document.createElement("li");
    li.tabIndex = 0;
    li.dataset.letter = letter;
    li.answerText = text;  // the exact text (the shown one may say "(empty)")
    const no = document.createElement("div");
    no.className = "rankno";
    const small = document.createElement("small");
    small.textContent = "answer " + letter;
    no.append(document.createTextNode(""), small);
    const body = document.createElement("pre");
    body.className = "answer-text" + (text === "" ? " empty" : "");
    body.textContent = text === "" ? "(empty answer: the model ended at once)" : text;
    const moves = document.createElement("div");
    moves.className = "moves";
    const up = document.createElement("button"), down = document.createElement("button");
    up.type = down.type = "button";
    up.className = "secondary move-up";
    down.className = "secondary move-down";
    up.textContent = "\u25B2 up";
    down.textContent = "\u25BC down";
    up.setAttribute("aria-label", "Move answer " + letter + " up");
    down.setAttribute("aria-label", "Move answer " + letter + " down");
    up.addEventListener("click", () => move(li, -1, up.disabled ? null : up));
    down.addEventListener("click", () => move(li, +1, down.disabled ? null : down));
    moves.append(up, down);
    li.append(no, body, moves);
    li.addEventListener("keydown", (event) => {
      if (event.target !== li) return;
      if (event.key !== "ArrowUp" && event.key !== "ArrowDown") return;
      event.preventDefault();
      const delta = event.key === "ArrowUp" ? -1 : +1;
      if (event.altKey) { move(li, delta, li); return; }
      const next = delta < 0 ? li.previousElementSibling : li.nextElementSibling;
      if (next) next.focus();
    });
    return li;
  }

  // Sample answers for the current prompt: one request with n = K. Identical answers are shown
  // once (a ranking orders distinct answers); with fewer than two distinct ones, sample again.
  async function sample() {
    setBusy(true);
    setStatus("sampling answers...", "loading");
    gptcore.showError(errorBox, null);
    list.replaceChildren();
    try {
      const model = await gptcore.model();
      settings = {model};
      for (const id of ["max_tokens", "temperature", "top_p"]) {
        const v = gptcore.number(id);
        if (v !== undefined) settings[id] = v;
      }
      let answers = [];
      for (let attempt = 1; attempt <= 3 && answers.length < 2; attempt++) {
        setStatus("sampling " + current.k + " answers" + (attempt > 1 ? " (again: too few " +
                  "distinct answers)" : "") + "...", "loading");
        const out = await gptcore.request("POST", "/v1/completions",
                                          {...settings, prompt: current.prompt, n: current.k});
        const texts = out.choices.slice().sort((a, b) => a.index - b.index).map((c) => c.text);
        answers = [...new Set(texts)];
      }
      if (answers.length < 2) {
        throw Object.assign(new Error("the model gave the same answer every time; raise the " +
                                      "temperature and resample, or skip this prompt"),
                            {title: "Nothing to rank"});
      }
      answers.forEach((text, i) => list.append(card(text, String.fromCharCode(65 + i))));
      renumber();
      setStatus(answers.length + " answers to order", "ready");
    } catch (e) {
      gptcore.showError(errorBox, e);
      setStatus("", "error");
    } finally {
      setBusy(false);
    }
  }

  // The next prompt to rank; skip: the index of the prompt the person passes over.
  async function nextPrompt(skip) {
    setBusy(true);
    setStatus("loading the next prompt...", "loading");
    gptcore.showError(errorBox, null);
    try {
      current = await gptcore.request("GET", "/rank/next" +
                                      (skip === undefined ? "" : "?skip=" + skip));
      $("rank-prompt").textContent = current.prompt;
      const times = (n, what) => n + " " + what + (n === 1 ? "" : "s");
      $("prompt-info").textContent = "prompt " + (current.index + 1) + " of " + current.prompts +
        " \u00B7 ranked " + times(current.rankings, "time") + " so far \u00B7 " +
        times(current.total, "ranking") + " in the file";
    } catch (e) {
      $("rank-prompt").textContent = "(no prompt)";
      list.replaceChildren();
      gptcore.showError(errorBox, e);
      setStatus("", "error");
      setBusy(false);
      if (e.status === 404) {  // ranking is off on this server: nothing to sample or skip
        for (const b of [submit, $("resample"), $("skip")]) b.disabled = true;
      }
      return;
    }
    await sample();
  }

  submit.addEventListener("click", async () => {
    if (busy) return;
    setBusy(true);
    try {
      const ranked = [...list.children].map((li) => li.answerText);
      const order = [...list.children].map((li) => li.dataset.letter).join(" > ");
      const saved = await gptcore.request("POST", "/rank/submit",
                                          {prompt: current.prompt, ranked, settings});
      setStatus("saved " + order + " (ranking " + saved.total + " in the file)", "saved");
      status.classList.add("saved");
      setTimeout(() => status.classList.remove("saved"), 1500);
    } catch (e) {
      gptcore.showError(errorBox, e);
      setStatus("not saved", "error");
      setBusy(false);
      return;
    }
    const message = status.textContent;
    await nextPrompt();
    if (status.dataset.state === "ready") setStatus(message + "; next prompt ready", "saved");
  });
  $("resample").addEventListener("click", () => { if (!busy && current) sample(); });
  $("skip").addEventListener("click", () => {
    if (!busy) nextPrompt(current ? current.index : undefined);
  });
  gptcore.model().catch(() => {});  // the model's name in the header, even when ranking is off
  nextPrompt();
})();
