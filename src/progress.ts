/**
 * Progress lines for long work (image builds, large syncs). They go to stderr only when it is a
 * terminal, so piped and scripted runs stay quiet; `force` shows them anyway (for `-v`).
 */
export type Progress = (line: string) => void;

export function progressReporter(options: { force?: boolean; stream?: NodeJS.WriteStream } = {}): Progress {
  const stream = options.stream ?? process.stderr;
  if (!options.force && !stream.isTTY) return () => {};
  return (line) => {
    stream.write(`mvmctl: ${line}\n`);
  };
}

export const silentProgress: Progress = () => {};
