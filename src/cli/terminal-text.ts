/**
 * Text that may come from the guest (its console, an agent's error text, a tool's complaint about
 * a hostile image) made safe to print as one line of mvmctl's own: control characters, which could
 * move the cursor, retitle or recolour the terminal or fake a line of output, and the bidirectional
 * overrides that reorder what is shown, are written out as escapes. Tabs and other text stay as they are.
 */
export function terminalSafe(text: string): string {
  return text.replace(/[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]/g, (c) => {
    const code = c.charCodeAt(0);
    return code < 0x100 ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
  });
}
