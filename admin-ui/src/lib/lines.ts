/** A diagnostic from the server: a line in the text it was sent, and why. */
export interface Diagnostic {
  line: number;
  message: string;
}

/** The text's lines, each with the problems reported at it (1-based lines). */
export function annotate(text: string, diagnostics: Diagnostic[]): { n: number; text: string; problems: string[] }[] {
  return text.split("\n").map((line, i) => ({
    n: i + 1,
    text: line,
    problems: diagnostics.filter((d) => d.line === i + 1).map((d) => d.message),
  }));
}

/** The route name a routes-file text declares (`- name: x`), if any. */
export function routeName(yaml: string): string | null {
  const m = /^\s*-?\s*name:\s*["']?([^"'\s#]+)/m.exec(yaml);
  return m ? m[1] : null;
}
