// gptcore serve pages: what the playground and the ranking page share. Plain browser JavaScript
// (no build step, no libraries): the model's name, JSON requests, OpenAI error JSON, and the
// server-sent events of a streamed completion.
"use strict";

const gptcore = {
  // The model this server serves (the first of GET /v1/models), fetched once (a failed fetch
  // is tried again at the next call).
  _model: null,
  model() {
    if (this._model === null) {
      this._model = this.request("GET", "/v1/models").then((body) => {
        if (!body.data || !body.data.length) throw new Error("GET /v1/models lists no model");
        const tag = document.getElementById("model-name");
        if (tag) tag.textContent = "model: " + body.data[0].id;
        return body.data[0].id;
      });
      this._model.catch(() => { this._model = null; });
    }
    return this._model;
  },

  // An Error for a failed request: OpenAI's {"error": {"message", "type", "param"}} when the
  // server sent it, else the status line and the start of the body.
  async responseError(response) {
    const text = await response.text();
    let message = text.slice(0, 500) || response.statusText;
    let detail = "";
    try {
      const err = JSON.parse(text).error;
      if (err && err.message) {
        message = err.message;
        detail = [err.type, err.param ? "param: " + err.param : ""].filter(Boolean).join(", ");
      }
    } catch (_) { /* not JSON: keep the text */ }
    const e = new Error(message);
    e.status = response.status;
    e.title = "HTTP " + response.status + (detail ? " (" + detail + ")" : "");
    return e;
  },

  // fetch() with a JSON body; resolves to the parsed JSON answer, rejects with responseError.
  async request(method, url, body, signal) {
    const init = {method, signal, headers: {}};
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    if (!response.ok) throw await this.responseError(response);
    return response.json();
  },

  // The `data:` payloads of a server-sent-events response, as they arrive (an async iterator).
  // Lines end in \n, \r\n or \r; one optional space after "data:" is not part of the payload.
  async *sseData(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), {stream: !done});
      let m;
      while ((m = /\r\n|\n|\r(?=[^\n])/.exec(buffer)) !== null) {
        const line = buffer.slice(0, m.index);
        buffer = buffer.slice(m.index + m[0].length);
        if (line.startsWith("data:")) yield line.slice(line.startsWith("data: ") ? 6 : 5);
      }
      if (done) {
        if (buffer.startsWith("data:")) yield buffer.slice(buffer.startsWith("data: ") ? 6 : 5);
        return;
      }
    }
  },

  // Show an Error in an element of class "error" (hidden when e is null).
  showError(box, e) {
    box.replaceChildren();
    box.hidden = !e;
    if (!e) return;
    const title = document.createElement("strong");
    title.textContent = e.title || "Error";
    box.append(title, document.createTextNode(e.message));
  },

  // A number from an input, or undefined when it is blank (the server's default then applies).
  number(id) {
    const raw = document.getElementById(id).value.trim();
    if (raw === "") return undefined;
    const v = Number(raw);
    if (!Number.isFinite(v)) throw Object.assign(new Error(id + ": not a number: " + raw),
                                                 {title: "Invalid setting"});
    return v;
  },
};
