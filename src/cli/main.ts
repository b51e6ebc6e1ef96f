import { readFileSync } from 'node:fs';
import { Command, CommanderError } from 'commander';
import { jsonRequested } from './command-output.js';
import { compileCommand } from './compile.js';
import { doctorCommand } from './doctor.js';
import { execCommand } from './exec.js';
import { describeFailure, printDebugStack, printFailure } from './failure.js';
import { imageCommand } from './image.js';
import { errorEvent, EventWriter } from './json-events.js';
import { templateCommand } from './template.js';
import { consoleCommand, superviseCommand, upCommand } from './up.js';
import { downCommand, lsCommand } from './vms.js';

const packageJson = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };

function program(): Command {
  const root = new Command('mvmctl')
    .description('Run one command in a fresh, disposable microVM and tear it down')
    .version(packageJson.version, '--version')
    .enablePositionalOptions()
    .showHelpAfterError(false);
  for (const command of [execCommand(), upCommand(), consoleCommand(), lsCommand(), downCommand(), imageCommand(), templateCommand(), compileCommand(), doctorCommand()]) root.addCommand(command);
  root.addCommand(superviseCommand(), { hidden: true });
  // Commander's own usage errors become one `mvmctl: …` line and exit 125, like every other failure of mvmctl itself.
  const configure = (command: Command) => {
    command.exitOverride().configureOutput({ outputError: () => {} });
    command.commands.forEach(configure);
  };
  configure(root);
  return root;
}

/**
 * Prints mvmctl's own failure and returns the exit code. With --json, exec and console report
 * their failures as events themselves; commander's come before their action, so the command line
 * says whether one is wanted.
 */
function report(error: unknown, root: Command): number {
  if (error instanceof CommanderError && error.exitCode === 0) return 0;
  printDebugStack(error);
  const failure = describeFailure(error);
  if (error instanceof CommanderError && jsonRequested(root, process.argv.slice(2))) new EventWriter(process.stdout).write(errorEvent(failure));
  else printFailure(failure);
  return failure.exitCode;
}

const root = program();
try {
  await root.parseAsync(process.argv);
} catch (error) {
  process.exitCode = report(error, root);
}
