from classify.cli import main
from extract.cli import exit_process

exit_process(main())
