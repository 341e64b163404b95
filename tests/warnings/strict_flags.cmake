# The flags of a user's strict build, shared by check_warnings.cmake and
# check_headers_alone.cmake: sets `strict_flags` from INCLUDE_DIR (polyattn, a plain -I),
# SYSTEM_DIRS (Eigen and xsimd, -isystem: their own warnings are not ours) and OPENMP.
set(strict_flags -std=c++17 -Wall -Wextra -Wpedantic -Wconversion -Wsign-conversion -Wshadow -Werror)
if(OPENMP)
  list(APPEND strict_flags -fopenmp)
endif()
list(APPEND strict_flags -I${INCLUDE_DIR})
foreach(dir IN LISTS SYSTEM_DIRS)
  list(APPEND strict_flags -isystem ${dir})
endforeach()
