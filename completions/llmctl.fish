# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_llmctl_global_optspecs
    string join \n socket= config= llama-server= no-autostart v/verbose h/help V/version
end

function __fish_llmctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_llmctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_llmctl_using_subcommand
    set -l cmd (__fish_llmctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c llmctl -n "__fish_llmctl_needs_command" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_needs_command" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_needs_command" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_needs_command" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_needs_command" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_needs_command" -s V -l version -d 'Print version'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "run" -d 'Generate text; tokens go to stdout as they arrive'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "embed" -d 'Print the embedding of each TEXT (or of each line of stdin) as a JSON line: {"index":N,"embedding":[...]}'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "status" -d 'Show the daemon, its queue and every model instance'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "warm" -d 'Load MODEL and return once it answers; quiet and idempotent, for cron'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "pin" -d 'Keep MODEL loaded: never evicted for memory, never unloaded by its TTL'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "unpin" -d 'Let MODEL be evicted and unloaded again'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "switch" -d 'Make MODEL the loaded one, in the background unless --wait'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "stop" -d 'Unload a model (or all of them) gracefully'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "daemon" -d 'Run the daemon in the foreground (for systemd or debugging)'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "shutdown" -d 'Stop every model gracefully, then the daemon'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "reload" -d 'Make the running daemon read its config again (as SIGHUP does): budgets, instance limit and default TTL change at once; the reply names settings that need `shutdown`'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "config" -d 'Print the effective configuration and where each value came from'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "logs" -d 'Print a model\'s llama-server log, or the daemon\'s'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "events" -d 'Print the daemon\'s state changes as JSON lines as they happen'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "metrics" -d 'Print the daemon\'s counters in Prometheus text format'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "serve" -d 'Serve llama-server\'s HTTP API (OpenAI and Anthropic compatible) for every model llmctl knows, from the daemon, until Ctrl-C; requests are forwarded unchanged and answers relayed byte for byte'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "ls" -d 'List every model llmctl can run: aliases, pulled models, the demo, files in the models directory'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "show" -d 'Show a model\'s details from its GGUF header: architecture, size, context, memory'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "pull" -d 'Download a GGUF model from the Hugging Face Hub (OWNER/REPO[:QUANT])'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "rm" -d 'Remove a model that `llmctl pull` downloaded'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "ps" -d 'List the loaded models, one line each'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "chat" -d 'Chat with MODEL on the terminal: the conversation is kept across turns'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "setup" -d 'Find or build llama-server and install the demo model'
complete -c llmctl -n "__fish_llmctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l system -d 'System message (chat mode)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -s n -l max-tokens -d 'Most tokens to generate: 1024 unless `max_tokens` in the config says otherwise; 0 for no limit' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l temperature -d 'Sampling temperature, 0 for greedy' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l top-p -d 'Nucleus sampling threshold, in [0, 1]' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l top-k -d 'Sample from the K most likely tokens (0 disables)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l min-p -d 'Minimum probability relative to the most likely token, in [0, 1]' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l repeat-penalty -d 'Penalty for repeated tokens (1 disables)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l seed -d 'Random seed, for reproducible sampling' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l stop -d 'Stop when this text is generated (repeatable; not empty)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -s s -l json-schema -d 'Make the output JSON valid for this JSON Schema: a file, or the schema itself' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l grammar -d 'Make the output follow this GBNF grammar file (llama.cpp\'s grammar format)' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l ctx-size -d 'Context size in tokens for this instance (llama-server -c)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l parallel -d 'Parallel slots of this instance (llama-server -np)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l gpu-layers -d 'Layers to offload to the GPU for this instance (llama-server --n-gpu-layers)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l raw -d 'Send the prompt as is, without the chat template'
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l json -d 'Write JSON lines: one per chunk, then a final `done` line with usage and timings'
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -l no-stdin -d 'Do not read stdin even when it is not a terminal'
complete -c llmctl -n "__fish_llmctl_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand embed" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand embed" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand embed" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand embed" -l ctx-size -d 'Context size in tokens for this instance (llama-server -c)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand embed" -l parallel -d 'Parallel slots of this instance (llama-server -np)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand embed" -l gpu-layers -d 'Layers to offload to the GPU for this instance (llama-server --n-gpu-layers)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand embed" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand embed" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand embed" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand status" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand status" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand status" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand status" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand status" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand status" -l json -d 'Print the status as one JSON object'
complete -c llmctl -n "__fish_llmctl_using_subcommand status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand warm" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand warm" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand warm" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand warm" -l ttl -d 'Keep it loaded (pinned) at least this long: 90s, 30m, 8h' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand warm" -l ctx-size -d 'Context size in tokens for this instance (llama-server -c)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand warm" -l parallel -d 'Parallel slots of this instance (llama-server -np)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand warm" -l gpu-layers -d 'Layers to offload to the GPU for this instance (llama-server --n-gpu-layers)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand warm" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand warm" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand warm" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand pin" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand pin" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand pin" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand pin" -l ctx-size -d 'Context size in tokens for this instance (llama-server -c)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand pin" -l parallel -d 'Parallel slots of this instance (llama-server -np)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand pin" -l gpu-layers -d 'Layers to offload to the GPU for this instance (llama-server --n-gpu-layers)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand pin" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand pin" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand pin" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand unpin" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand unpin" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand unpin" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand unpin" -l ctx-size -d 'Context size in tokens for this instance (llama-server -c)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand unpin" -l parallel -d 'Parallel slots of this instance (llama-server -np)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand unpin" -l gpu-layers -d 'Layers to offload to the GPU for this instance (llama-server --n-gpu-layers)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand unpin" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand unpin" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand unpin" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand switch" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand switch" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand switch" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand switch" -l ctx-size -d 'Context size in tokens for this instance (llama-server -c)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand switch" -l parallel -d 'Parallel slots of this instance (llama-server -np)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand switch" -l gpu-layers -d 'Layers to offload to the GPU for this instance (llama-server --n-gpu-layers)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand switch" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand switch" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand switch" -l wait -d 'Return only once the model is ready'
complete -c llmctl -n "__fish_llmctl_using_subcommand switch" -l exclusive -d 'Unload every other model once this one is ready'
complete -c llmctl -n "__fish_llmctl_using_subcommand switch" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand stop" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand stop" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand stop" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand stop" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand stop" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand stop" -l all -d 'Unload every model'
complete -c llmctl -n "__fish_llmctl_using_subcommand stop" -l forget -d 'Also drop the model\'s saved prompt caches (with --all: every saved cache), and save none'
complete -c llmctl -n "__fish_llmctl_using_subcommand stop" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand daemon" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand daemon" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand daemon" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand daemon" -l queue-depth -d 'Requests that may wait for a slot before new ones are refused as busy' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand daemon" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand daemon" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand daemon" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand shutdown" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand shutdown" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand shutdown" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand shutdown" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand shutdown" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand shutdown" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand reload" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand reload" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand reload" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand reload" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand reload" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand reload" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand config" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand config" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand config" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand config" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand config" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand config" -l json -d 'Print the settings as JSON'
complete -c llmctl -n "__fish_llmctl_using_subcommand config" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -s n -l lines -d 'Print only the last N lines first' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -l ctx-size -d 'Context size in tokens for this instance (llama-server -c)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -l parallel -d 'Parallel slots of this instance (llama-server -np)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -l gpu-layers -d 'Layers to offload to the GPU for this instance (llama-server --n-gpu-layers)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -l daemon -d 'The daemon\'s own log instead of a model\'s'
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -s f -l follow -d 'Keep printing what is appended, until Ctrl-C'
complete -c llmctl -n "__fish_llmctl_using_subcommand logs" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand events" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand events" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand events" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand events" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand events" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand events" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand metrics" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand metrics" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand metrics" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand metrics" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand metrics" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand metrics" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand serve" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand serve" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand serve" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand serve" -l listen -d 'Address to listen on; beyond loopback an API key is required' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand serve" -l api-key-file -d 'File holding the API key clients must send as `Authorization: Bearer KEY` or `x-api-key: KEY` (or set LLMCTL_API_KEY)' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand serve" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand serve" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand serve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand ls" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand ls" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand ls" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand ls" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand ls" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand ls" -l json -d 'Print the list as a JSON array'
complete -c llmctl -n "__fish_llmctl_using_subcommand ls" -l names -d 'Print only the names, one per line (for shell completion)'
complete -c llmctl -n "__fish_llmctl_using_subcommand ls" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand show" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand show" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand show" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand show" -l ctx-size -d 'Context size in tokens for this instance (llama-server -c)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand show" -l parallel -d 'Parallel slots of this instance (llama-server -np)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand show" -l gpu-layers -d 'Layers to offload to the GPU for this instance (llama-server --n-gpu-layers)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand show" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand show" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand show" -l template -d 'Print the chat template (alone, or as `chat_template` with --json)'
complete -c llmctl -n "__fish_llmctl_using_subcommand show" -l json -d 'Print the details as one JSON object'
complete -c llmctl -n "__fish_llmctl_using_subcommand show" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand pull" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand pull" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand pull" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand pull" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand pull" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand pull" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand rm" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand rm" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand rm" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand rm" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand rm" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand rm" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand ps" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand ps" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand ps" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand ps" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand ps" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand ps" -l json -d 'Print the loaded instances as a JSON array'
complete -c llmctl -n "__fish_llmctl_using_subcommand ps" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -l system -d 'System message for the conversation (`/system TEXT` changes it)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -l temperature -d 'Sampling temperature, 0 for greedy (`/set temperature X` changes it)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -s n -l max-tokens -d 'Most tokens in one answer: 1024 unless `max_tokens` in the config says otherwise; 0 for no limit (`/set parameter num_predict N` changes it)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -l ctx-size -d 'Context size in tokens for this instance (llama-server -c)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -l parallel -d 'Parallel slots of this instance (llama-server -np)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -l gpu-layers -d 'Layers to offload to the GPU for this instance (llama-server --n-gpu-layers)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand chat" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -l socket -d 'Unix socket of the daemon' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -l config -d 'Config file' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -l llama-server -d 'llama-server binary the daemon runs' -r -F
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -s j -l jobs -d 'Parallel compile jobs when building llama-server (default: number of CPUs)' -r
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -l backend -d 'Build llama-server for this backend instead of the one detected (CUDA with an NVIDIA GPU and nvcc, Vulkan with its SDK, else the CPU)' -r -f -a "cpu\t''
cuda\t''
vulkan\t''"
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -l no-autostart -d 'Fail instead of starting the daemon when none answers'
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -s v -l verbose -d 'More diagnostics on stderr (timings with `run`; repeat for debug logs)'
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -l no-model -d 'Do not install the demo model'
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -s q -l quiet -d 'Print nothing but errors'
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -l portable -d 'For the CPU: a build that runs on any x86-64 of its class, not only this CPU'
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -l dry-run -d 'Print the backend, CMake options and install path that setup would use; change nothing'
complete -c llmctl -n "__fish_llmctl_using_subcommand setup" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "run" -d 'Generate text; tokens go to stdout as they arrive'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "embed" -d 'Print the embedding of each TEXT (or of each line of stdin) as a JSON line: {"index":N,"embedding":[...]}'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "status" -d 'Show the daemon, its queue and every model instance'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "warm" -d 'Load MODEL and return once it answers; quiet and idempotent, for cron'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "pin" -d 'Keep MODEL loaded: never evicted for memory, never unloaded by its TTL'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "unpin" -d 'Let MODEL be evicted and unloaded again'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "switch" -d 'Make MODEL the loaded one, in the background unless --wait'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "stop" -d 'Unload a model (or all of them) gracefully'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "daemon" -d 'Run the daemon in the foreground (for systemd or debugging)'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "shutdown" -d 'Stop every model gracefully, then the daemon'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "reload" -d 'Make the running daemon read its config again (as SIGHUP does): budgets, instance limit and default TTL change at once; the reply names settings that need `shutdown`'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "config" -d 'Print the effective configuration and where each value came from'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "logs" -d 'Print a model\'s llama-server log, or the daemon\'s'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "events" -d 'Print the daemon\'s state changes as JSON lines as they happen'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "metrics" -d 'Print the daemon\'s counters in Prometheus text format'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "serve" -d 'Serve llama-server\'s HTTP API (OpenAI and Anthropic compatible) for every model llmctl knows, from the daemon, until Ctrl-C; requests are forwarded unchanged and answers relayed byte for byte'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "ls" -d 'List every model llmctl can run: aliases, pulled models, the demo, files in the models directory'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "show" -d 'Show a model\'s details from its GGUF header: architecture, size, context, memory'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "pull" -d 'Download a GGUF model from the Hugging Face Hub (OWNER/REPO[:QUANT])'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "rm" -d 'Remove a model that `llmctl pull` downloaded'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "ps" -d 'List the loaded models, one line each'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "chat" -d 'Chat with MODEL on the terminal: the conversation is kept across turns'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "setup" -d 'Find or build llama-server and install the demo model'
complete -c llmctl -n "__fish_llmctl_using_subcommand help; and not __fish_seen_subcommand_from run embed status warm pin unpin switch stop daemon shutdown reload config logs events metrics serve ls show pull rm ps chat setup help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c llmctl -n "__fish_llmctl_using_subcommand run embed warm pin unpin switch stop logs show rm chat" -a "(llmctl ls --names 2>/dev/null)" -d 'model'
