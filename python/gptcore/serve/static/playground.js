// /playground: one completion request with stream: true; the text is appended as each
// server-sent event arrives. The Submit button turns into Stop while a completion runs.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("form"), button = $("submit"), status = $("status"), errorBox = $("error");
  let running = null;  // the AbortController of the request in flight

  // each slider mirrors its number box (the number box is what is sent)
  for (const id of ["temperature", "top_p", "frequency_penalty", "presence_penalty"]) {
    const box = $(id), slider = $(id + "-range");
    slider.addEventListener("input", () => { box.value = slider.value; });
    box.addEventListener("input", () => { slider.value = box.value; });
  }

  function setStatus(text, state) {
    status.textContent = text;
    status.dataset.state = state;
  }

  function setRunning(controller) {
    running = controller;
    button.textContent = controller ? "Stop" : "Submit";
    button.classList.toggle("stop", !!controller);
  }

  // The request body from the form; blank fields are left out so the server's defaults apply.
  function requestBody(model) {
    const body = {model, prompt: $("prompt").value, stream: true};
    for (const id of ["max_tokens", "temperature", "top_p", "frequency_penalty",
                      "presence_penalty", "seed"]) {
      const v = gptcore.number(id);
      if (v !== undefined) body[id] = v;
    }
    const stops = $("stop").value.split("\n").filter((s) => s !== "")
      .map((s) => s.replace(/\\n/g, "\n"));
    if (stops.length) body.stop = stops;
    return body;
  }

  async function run() {
    gptcore.showError(errorBox, null);
    const controller = new AbortController();
    setRunning(controller);
    const echo = $("echo"), out = $("completion");
    out.textContent = "";
    echo.textContent = "";
    let pieces = 0, finish = null;
    const t0 = performance.now();
    try {
      const body = requestBody(await gptcore.model());
      if ($("show-prompt").checked) echo.textContent = body.prompt;
      setStatus("waiting for the first token...", "running");
      const response = await fetch("/v1/completions", {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) throw await gptcore.responseError(response);
      for await (const data of gptcore.sseData(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) {  // an error after the stream began
          throw Object.assign(new Error(chunk.error.message || "error"),
                              {title: "Error while streaming (" + (chunk.error.type || "") + ")"});
        }
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.text) {
          out.textContent += choice.text;
          pieces += 1;
          setStatus(pieces + " chunks, " + ((performance.now() - t0) / 1000).toFixed(1) + " s",
                    "running");
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      const secs = ((performance.now() - t0) / 1000).toFixed(2);
      setStatus("done: " + pieces + " chunks in " + secs + " s, finish_reason: " + finish, "done");
    } catch (e) {
      if (e.name === "AbortError") {
        setStatus("stopped after " + pieces + " chunks", "stopped");
      } else {
        gptcore.showError(errorBox, e);
        setStatus("failed", "error");
      }
    } finally {
      setRunning(null);
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (running) running.abort(); else run();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      if (!running) run();
    }
  });
  gptcore.model().catch((e) => gptcore.showError(errorBox, e));
})();
