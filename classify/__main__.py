from classify.cli import main
from extract.commands import exit_process

exit_process(main())
