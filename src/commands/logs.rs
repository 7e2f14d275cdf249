//! `llmctl logs MODEL [-f]` / `llmctl logs --daemon`: print a log file the daemon writes.
//! Reads files only; needs no daemon.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::cli::LogsArgs;
use crate::context::Context;
use crate::error::{Error, Result};

/// How often `--follow` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub(crate) fn run(context: &Context, args: LogsArgs) -> Result<()> {
    let path = match &args.model {
        Some(name) => {
            let spec = context.resolve_model(name, &args.load.overrides())?;
            context.paths.instance_logs_dir.join(spec.log_file_name())
        }
        None => context.paths.daemon_log(),
    };
    let mut file = File::open(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => {
            Error::NotLoaded { message: format!("no log at {}: the model has not been loaded yet", path.display()) }
        }
        _ => Error::io(format!("cannot open {}", path.display()), e),
    })?;
    let mut out = io::stdout().lock();
    let written = print_tail(&mut file, args.lines, &mut out).and_then(|()| out.flush());
    if let Err(e) = written {
        return quiet_broken_pipe(e);
    }
    if !args.follow {
        return Ok(());
    }
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    let mut buffer = Vec::new();
    while !INTERRUPTED.load(Ordering::SeqCst) {
        buffer.clear();
        file.read_to_end(&mut buffer).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        if !buffer.is_empty() {
            if let Err(e) = out.write_all(&buffer).and_then(|()| out.flush()) {
                return quiet_broken_pipe(e);
            }
        }
        std::thread::sleep(FOLLOW_POLL);
    }
    Err(Error::Interrupted)
}

fn print_tail(file: &mut File, lines: Option<usize>, out: &mut impl Write) -> io::Result<()> {
    let Some(wanted) = lines else {
        io::copy(file, out)?;
        return Ok(());
    };
    let mut tail = std::collections::VecDeque::with_capacity(wanted);
    for line in BufReader::new(&mut *file).split(b'\n') {
        if tail.len() == wanted {
            tail.pop_front();
        }
        if wanted > 0 {
            tail.push_back(line?);
        }
    }
    for line in tail {
        out.write_all(&line)?;
        out.write_all(b"\n")?;
    }
    file.seek(SeekFrom::End(0))?;
    Ok(())
}

/// A closed pipe (`| head`) is the reader's choice, not a failure.
fn quiet_broken_pipe(error: io::Error) -> Result<()> {
    if error.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(Error::io("cannot write to stdout", error))
    }
}
